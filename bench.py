"""Speed and memory of aent.py's training step, optionally side by side with TRL's GRPOTrainer.

    python bench.py                  # CPU: a 2-layer Qwen2 with the real 151,936-token vocabulary,
                                     #      64 sampled sequences x 16 tokens per step
    python bench.py --vs-trl         # the same steps in TRL's GRPOTrainer with its entropy bonus
    python bench.py --preset 1.5b    # GPU: the Qwen2.5-1.5B shape with random weights
    python bench.py --spread         # the update phase on completions of spread lengths,
                                     #      micro-batches trimmed to their own width or not

Both trainers load the same randomly initialised checkpoint (written to a temporary directory),
sample from the same prompts (the toy task) with the same batch, group size, completion length,
temperature and entropy coefficient, and take one optimizer step per batch. Each run is its own
child process, one after another, so its peak memory is its own: peak RSS (VmHWM) on CPU,
torch.cuda.max_memory_allocated on GPU. Step times are medians over the steps after a warm-up step.

Also measured: the log-prob + clamped-entropy pass alone (forward and backward over N completion
tokens, the head of the model only): `aent.head_stats` as training runs it (chunks of
`logits_chunk` tokens under torch.utils.checkpoint) against full logits (one [N, V] fp32 tensor,
log_softmax, gather, `aent.clamped_entropy`), each with its peak extra memory. On CPU these runs
serve blocks of 1 MiB or more by mmap (glibc's M_MMAP_THRESHOLD), so that peak RSS counts live
tensors rather than heap fragmentation.
Prints a table and writes bench.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import aent
from grader import grade
from support import data, demo, models, rundir

PRESETS = {
    "tiny": dict(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=256,
        vocab=151936,
        prompts=4,
        group=16,
        new_tokens=16,
        steps=3,
        chunk=256,
        micro=64,
        pass_tokens=[512, 2048],
    ),
    "1.5b": dict(
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        intermediate=8960,
        vocab=151936,
        prompts=32,
        group=16,
        new_tokens=1024,
        steps=2,
        chunk=1024,
        micro=8,
        pass_tokens=[4096, 16384],
    ),
}
SPREAD = dict(  # --spread: the update phase alone, on one step of synthetic rollouts
    hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=99, prompts=4, group=8,
    new_tokens=1024, prompt_tokens=(50, 200), median=400, sigma=0.7, at_limit=0.1, micro=4,
    chunk=256,
)  # fmt: skip
LR, COEF = 1e-6, 0.002


# ----------------------------------------------------------------------------------------------
# memory: peak RSS on CPU (resettable through /proc), peak allocated on GPU
# ----------------------------------------------------------------------------------------------
def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def memory_mib(device, peak=True):
    """Current or peak memory of this process (VmHWM is its own; ru_maxrss would count the
    parent's RSS at exec)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (
            torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        ) / 2**20
    return _status_kib("VmHWM" if peak else "VmRSS") / 1024


# ----------------------------------------------------------------------------------------------
# the checkpoint both trainers load
# ----------------------------------------------------------------------------------------------
def write_model(p, path, device):
    """A randomly initialised Qwen2 of the preset's shape, with aent's 99-character tokenizer (ids
    beyond it decode to nothing), saved where both trainers load it from."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = demo.build_tiny()
    config = Qwen2Config(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=p["hidden"] < 2048,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the child runs


# ----------------------------------------------------------------------------------------------
# child runs: each prints one line "RESULT {json}"
# ----------------------------------------------------------------------------------------------
def run_ours(p, model_dir, work, device):
    args = aent.Args(
        model=model_dir,
        dataset="toy",
        out_dir=os.path.join(work, "ours"),
        steps=1 + p["steps"],
        prompts_per_step=p["prompts"],
        group_size=p["group"],
        max_new_tokens=p["new_tokens"],
        max_prompt_tokens=256,
        temperature=1.0,
        top_p=1.0,
        rollout_batch_size=p["prompts"] * p["group"],
        mini_batch_prompts=p["prompts"],
        micro_batch_size=p["micro"],
        lr=LR,
        lora_rank=p.get("lora_rank", 0),
        entropy="clamped",
        entropy_coef=COEF,
        logits_chunk=p["chunk"],
        save_every=0,
        sample_every=0,
    )
    aent.train(args)
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f][1:]  # the first step warms up
    B = p["prompts"] * p["group"]
    return dict(
        step_time=statistics.median(m["step_time"] for m in steps),
        rollout_time=statistics.median(m["rollout_time"] for m in steps),
        train_time=statistics.median(m["step_time"] - m["rollout_time"] for m in steps),
        tokens=statistics.median(m["response_len"] * B for m in steps),
        peak_mib=memory_mib(device),
    )


def run_trl(p, model_dir, work, device):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = [
        {"prompt": aent.build_prompt(tokenizer, q["question"]), "gold": q["gold"]}
        for q in data.load_problems("toy")
    ]
    B, steps = p["prompts"] * p["group"], 1 + p["steps"]
    dataset = Dataset.from_list(rows * (B * steps // len(rows) + 1))

    def reward(prompts, completions, gold, **kw):  # the grader aent.py trains with
        return [grade(c, g) for c, g in zip(completions, gold)]

    times = {"step": [], "rollout": [], "tokens": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()
            times["rollout"].append(0.0)

        def on_step_end(self, *a, **k):
            times["step"].append(time.time() - self.t)

    # one generation of B completions and one optimizer step per step, p["micro"] sequences a
    # forward
    config = GRPOConfig(
        output_dir=os.path.join(work, "trl"),
        per_device_train_batch_size=p["micro"],
        gradient_accumulation_steps=B // p["micro"],
        num_generations=p["group"],
        max_completion_length=p["new_tokens"],
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=0.0,
        entropy_coef=COEF,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    frozen_bf16 = p.get("lora_rank") and device.type == "cuda"  # as aent.py's LoRA base
    dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    peft_config = None
    if p.get("lora_rank"):  # the same adapters as aent.py's: every linear layer, alpha 32
        from peft import LoraConfig

        peft_config = LoraConfig(r=p["lora_rank"], lora_alpha=32, target_modules="all-linear")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
        peft_config=peft_config,
    )
    for name in (
        "_generate",
        "_calculate_rewards",
    ):  # rollout = sampling + decoding + grading, as in aent.py
        inner = getattr(trainer, name)

        def timed(*a, _inner=inner, **k):
            t = time.time()
            out = _inner(*a, **k)
            times["rollout"][-1] += time.time() - t
            return out

        setattr(trainer, name, timed)
    trainer.train()
    lengths = [
        h["completions/mean_length"]
        for h in trainer.state.log_history
        if "completions/mean_length" in h
    ]
    return dict(
        step_time=statistics.median(times["step"][1:]),
        rollout_time=statistics.median(times["rollout"][1:]),
        train_time=statistics.median(
            s - r for s, r in zip(times["step"][1:], times["rollout"][1:])
        ),
        tokens=statistics.median(float(x) * B for x in lengths[1:]),
        peak_mib=memory_mib(device),
    )


def full_logits_stats(hidden, weight, targets, drop_frac):
    """Without chunks: [N, V] fp32 logits at once, log_softmax, gather, clamped entropy."""
    logits = hidden.float() @ weight.float().T  # [N, V]
    logp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [N]
    return logp, aent.clamped_entropy(logits, drop_frac)


def run_pass(p, kind, n, device):
    torch.manual_seed(0)
    V, D = p["vocab"], p["hidden"]
    weight = (torch.randn(V, D, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(n, D, device=device).requires_grad_()
    targets = torch.randint(0, V, (n,), device=device)
    weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)  # in the baseline
    if device.type == "cpu":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: see the docstring

    def once():
        if kind == "chunked":
            logp, h_clamped, *_ = aent.head_stats(
                hidden, targets, weight, None, 1.0, 0.33, None, p["chunk"]
            )
        else:
            logp, h_clamped = full_logits_stats(hidden, weight, targets, 0.33)
        (logp.sum() + h_clamped.sum()).backward()

    once()  # warm-up
    reset_peak(device)
    base = memory_mib(device, peak=False)
    t = time.time()
    once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(time=time.time() - t, extra_mib=memory_mib(device) - base)


def spread_rollout(p, seed=0):
    """One step's rollouts, synthetic: prompts of uniform length in p["prompt_tokens"], left-padded,
    G completions each whose lengths are log-normal (median p["median"], sigma p["sigma"]) clipped
    to [100, limit], a fraction p["at_limit"] cut at the limit (no EOS). A modelled spread, in the
    shape of base Qwen2.5-Math's on MATH (100 tokens to the 3,072 limit), not a measured one."""
    gen = torch.Generator().manual_seed(seed)
    G, T, (lo, hi) = p["group"], p["new_tokens"], p["prompt_tokens"]
    prompt_len = torch.randint(lo, hi + 1, (p["prompts"],), generator=gen).repeat_interleave(G)
    B, P = len(prompt_len), hi
    ids = torch.randint(3, p["vocab"], (B, P + T), generator=gen)
    attn = (torch.arange(P + T) >= P - prompt_len[:, None]).long()  # [B, P+T] left padding
    length = (p["median"] * torch.exp(p["sigma"] * torch.randn(B, generator=gen))).round()
    length = length.clamp(100, T).long()
    cut = torch.rand(B, generator=gen) < p["at_limit"]
    length[cut] = T
    mask = (torch.arange(T) < length[:, None]).long()  # [B, T]
    ids[:, P:][mask == 0] = 0  # pad (and EOS) id 0 after each completion
    ids[~cut, P + length[~cut] - 1] = 0  # the EOS that ends it
    attn[:, P:] = mask
    ids[attn == 0] = 0
    adv = torch.randn(B, generator=gen)
    return dict(input_ids=ids, attention_mask=attn, mask=mask), adv


def untrimmed_update(model, opt, roll, adv, p):
    """The update as it ran before micro-batches were trimmed: rows in group order, every
    micro-batch at the step's full width; the same token-mean loss, one optimizer step."""
    mask, n = roll["mask"], roll["mask"].sum()
    for rows in torch.arange(mask.size(0)).split(p["micro"]):
        with models.autocast(adv.device):
            ids, attn = roll["input_ids"][rows], roll["attention_mask"][rows]
            logp, h, *_ = aent.token_stats(
                model, ids, attn, mask[rows], 1.0, 0.33, None, p["chunk"]
            )
        loss, _ = aent.aent_loss(logp, logp.detach(), adv[rows], mask[rows], h, COEF)
        (loss * (mask[rows].sum() / n)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_update(p, trimmed: bool, model_dir, device):
    """One update step on spread_rollout's batch, timed after a warm-up step, with the positions
    the decoder saw (summed over micro-batches) and this process's peak memory."""
    model, _ = models.load_model(model_dir, device)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    roll, adv = spread_rollout(p)
    roll, adv = {k: v.to(device) for k, v in roll.items()}, adv.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    args = aent.Args(model=model_dir, prompts_per_step=p["prompts"], group_size=p["group"],
                     mini_batch_prompts=p["prompts"], micro_batch_size=p["micro"],
                     logits_chunk=p["chunk"], entropy_coef=COEF)  # fmt: skip
    positions, token_stats = [], aent.token_stats

    def counted(net, ids, *rest):
        positions.append(ids.numel())
        return token_stats(net, ids, *rest)

    aent.token_stats = counted
    times = []
    for _ in range(2):  # a warm-up step, then the measured one
        positions.clear()
        reset_peak(device)
        base, t = memory_mib(device, peak=False), time.time()
        if trimmed:
            aent.policy_update(model, opt, roll, roll["mask"], adv, COEF, args)
        else:
            untrimmed_update(model, opt, roll, adv, p)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
    real = int(roll["attention_mask"].sum())
    return dict(time=times[-1], peak_mib=memory_mib(device), extra_mib=memory_mib(device) - base,
                positions=sum(positions), padding=1 - real / sum(positions),
                real_tokens=real)  # fmt: skip


def bench_spread() -> dict:
    """--spread: the update phase with micro-batches trimmed (aent.policy_update) and untrimmed,
    each in its own process, in one run."""
    p = SPREAD
    roll, _ = spread_rollout(p)
    lengths = roll["mask"].sum(1).float()
    at_limit = int((lengths == p["new_tokens"]).sum())
    print(f"spread preset: {p['prompts']} prompts x {p['group']} completions, limit "
          f"{p['new_tokens']} tokens; completion lengths median {lengths.median():.0f}, mean "
          f"{lengths.mean():.0f}, {at_limit} at the limit; micro-batch {p['micro']}; hidden "
          f"{p['hidden']}, {p['layers']} layers")  # fmt: skip
    results = {"config": p, "lengths": lengths.tolist()}
    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        write_model(p, model_dir, "cuda" if torch.cuda.is_available() else "cpu")
        for kind in ("untrimmed", "trimmed"):
            print(f"  running the update, {kind} ...", flush=True)
            results[kind] = spawn(f"update-{kind}", json.dumps(p), model_dir, work)
    u, t = results["untrimmed"], results["trimmed"]
    print(f"\n{'':28s}{'untrimmed':>12s}{'trimmed':>12s}{'ratio':>9s}")
    for label, key, fmt in [("update time (s)", "time", "{:.2f}"),
                            ("peak memory (MiB)", "peak_mib", "{:.0f}"),
                            ("of which the update (MiB)", "extra_mib", "{:.0f}"),
                            ("decoder positions", "positions", "{:.0f}"),
                            ("padding fraction", "padding", "{:.3f}")]:  # fmt: skip
        ratio = f"{u[key] / t[key]:>8.2f}x" if t[key] else ""
        print(f"{label:28s}{fmt.format(u[key]):>12s}{fmt.format(t[key]):>12s}{ratio}")
    return results


def child(argv):
    kind, p, model_dir, work = argv[0], json.loads(argv[1]), argv[2], argv[3]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "ours":
        out = run_ours(p, model_dir, work, device)
    elif kind.startswith("update-"):
        out = run_update(p, kind == "update-trimmed", model_dir, device)
    elif kind == "trl":
        out = run_trl(p, model_dir, work, device)
    else:
        out = run_pass(p, kind.split("-")[1], int(argv[4]), device)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# parent: run the children in turn, print the table, write bench.json
# ----------------------------------------------------------------------------------------------
def spawn(*argv):
    t = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        sys.exit(f"error: the {argv[0]} run failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_time"] = time.time() - t
    return out


PATHOLOGICAL = {  # completion, gold: the slowest inputs the grader has met
    "200 nested parentheses": ("\\boxed{" + "(" * 200 + "5" + ")" * 200 + "}", "5"),
    "a tower of exponents": ("\\boxed{10^{10^{10^{10}}}}", "3"),
    "40 nested fractions": ("\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}", "1"),
    "a 300-term polynomial": ("\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(300)) + "}", "x"),
    "100 kB without a box": ("7 " * 50000, "7"),
}


def bench_grader(data_dir: str) -> dict:
    """`grade` on every reference solution of MATH-500, GSM8K and Minerva (from data_dir) as a
    completion, against its own gold and against the next problem's (wrong answers, written
    differently: the path through math-verify), one process, cache cleared per set; then the
    pathological inputs one by one. Completions/s, acceptance and the slowest single call."""
    import grader
    from support import equivalence

    def math500(r):
        return r["solution"], r["answer"]

    def gsm8k(r):
        return r["answer"], data.problem_from_row(r)["gold"]

    def minerva(r):  # no answer field: the gold is the solution's last box
        return r["solution"], grader.last_boxed(r["solution"])

    sets = {"math500": ("math500_test.jsonl", math500), "gsm8k": ("gsm8k_test.jsonl", gsm8k),
            "minerva": ("minerva_math_test.jsonl", minerva)}  # fmt: skip
    grader.grade("\\boxed{1}", "1")  # imports math-verify
    results = {}
    for name, (file, pair) in sets.items():
        path = os.path.join(data_dir, file)
        if not os.path.isfile(path):
            print(f"  {path} not present: skipped")
            continue
        own = [pair(json.loads(line)) for line in open(path, encoding="utf-8")]
        shifted = [(c, g) for (c, _), (_, g) in zip(own, own[1:] + own[:1])]  # mostly wrong
        for label, pairs in ((name, own), (name + " shifted", shifted)):
            equivalence._PARSED.clear()
            times, accepted = [], 0
            for completion, gold in pairs:
                t0 = time.perf_counter()
                accepted += grader.grade(completion, gold)
                times.append(time.perf_counter() - t0)
            rate, slowest = len(pairs) / sum(times), max(times)
            results[label] = {"n": len(pairs), "accepted": accepted, "per_s": rate,
                              "slowest_s": slowest}  # fmt: skip
            print(f"  {label}: {len(pairs)} graded, {accepted:.0f} accepted, "
                  f"{rate:.0f} completions/s, slowest {slowest:.2f} s")  # fmt: skip
    for name, (completion, gold) in PATHOLOGICAL.items():
        equivalence._PARSED.clear()
        t0 = time.perf_counter()
        verdict = grader.grade(completion, gold)
        results[name] = {"verdict": verdict, "seconds": time.perf_counter() - t0}
        print(f"  {name}: {verdict:.0f} in {results[name]['seconds']:.2f} s")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="model shape and batch: 'tiny' (CPU default) or '1.5b' (GPU default); see PRESETS",
    )
    ap.add_argument(
        "--vs-trl",
        action="store_true",
        help="also run TRL's GRPOTrainer on the same model and batch",
    )
    ap.add_argument(
        "--steps", type=int, help="measured steps after the warm-up step (default: the preset's)"
    )
    ap.add_argument("--new-tokens", type=int, help="completion length (default: the preset's)")
    ap.add_argument(
        "--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: all weights)"
    )
    ap.add_argument(
        "--no-pass", action="store_true", help="skip the log-prob + clamped-entropy pass comparison"
    )
    ap.add_argument(
        "--grader",
        metavar="DATA_DIR",
        help="instead: grading speed on the reference solutions in DATA_DIR (math500_test.jsonl, "
        "gsm8k_test.jsonl, minerva_math_test.jsonl) and on pathological answers",
    )
    ap.add_argument(
        "--spread",
        action="store_true",
        help="instead: the update phase on completions of spread lengths (SPREAD), micro-batches "
        "trimmed to their own width against untrimmed",
    )
    ap.add_argument("--out", default="bench.json", help="where to write the results")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child)
    if a.grader or a.spread:
        results = {"grader": bench_grader(a.grader)} if a.grader else {"spread": bench_spread()}
        rundir.write_atomic(a.out, json.dumps(results, indent=1))
        return print(f"wrote {a.out}")
    cuda = torch.cuda.is_available()
    preset = a.preset or ("1.5b" if cuda else "tiny")
    p = dict(PRESETS[preset])
    for key, value in (("steps", a.steps), ("new_tokens", a.new_tokens)):
        if value is not None:
            if value < 1:
                sys.exit(f"error: --{key.replace('_', '-')} must be at least 1")
            p[key] = value
    if a.lora_rank < 0:
        sys.exit("error: --lora-rank must be at least 0")
    p["lora_rank"] = a.lora_rank
    if a.vs_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("error: --vs-trl needs trl (pip install trl)")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"

    print(
        f"preset {preset} on {device}: hidden {p['hidden']}, {p['layers']} layers, "
        f"vocab {p['vocab']}; "
        f"{p['prompts']} prompts x {p['group']} samples x {p['new_tokens']} tokens per step, "
        f"{p['steps']} measured steps after 1 warm-up; "
        + (f"LoRA rank {p['lora_rank']}" if p["lora_rank"] else "all weights trained")
    )
    results = {"preset": preset, "config": p, "device": device, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        write_model(p, model_dir, "cuda" if cuda else "cpu")
        runs = ["ours"] + (["trl"] if a.vs_trl else [])
        for kind in runs:
            print(f"  running {kind} ...", flush=True)
            results[kind] = spawn(kind, json.dumps(p), model_dir, work)
        if not a.no_pass:
            for n in p["pass_tokens"]:
                for kind in ("chunked", "full"):
                    print(f"  log-prob + clamped-entropy pass, {kind}, {n} tokens ...", flush=True)
                    results[f"pass_{kind}_{n}"] = spawn(
                        f"pass-{kind}", json.dumps(p), model_dir, work, n
                    )

    mem = "peak GPU memory allocated (MiB)" if cuda else "peak RSS (MiB)"
    rows = [
        ("step time (s)", "step_time", "{:.2f}"),
        ("rollout tokens/s", "rollout_tps", "{:.0f}"),
        ("training tokens/s", "train_tps", "{:.0f}"),
        (mem, "peak_mib", "{:.0f}"),
        ("whole process (s)", "process_time", "{:.1f}"),
    ]
    for kind in runs:
        r = results[kind]
        r["rollout_tps"] = r["tokens"] / r["rollout_time"]
        r["train_tps"] = r["tokens"] / r["train_time"]
    print(
        f"\n{'':34s}"
        + "".join(f"{k:>12s}" for k in runs)
        + ("       ratio" if len(runs) == 2 else "")
    )
    for label, key, fmt in rows:
        vals = [results[k][key] for k in runs]
        line = f"{label:34s}" + "".join(f"{fmt.format(v):>12s}" for v in vals)
        if len(runs) == 2:
            line += f"{vals[0] / vals[1]:>11.2f}x"
        print(line)
    if a.vs_trl:
        results["ratios"] = {
            k: results["ours"][k] / results["trl"][k]
            for k in ("step_time", "peak_mib", "process_time")
        }
    if not a.no_pass:
        V = p["vocab"]
        print(
            "\nlog-prob + clamped-entropy pass alone "
            f"(forward + backward, V = {V}, chunk {p['chunk']}):"
        )
        print(
            f"{'tokens':>8s} {'chunked s':>10s} {'full s':>8s} {'chunked extra MiB':>18s} "
            f"{'full extra MiB':>15s}"
        )
        for n in p["pass_tokens"]:
            ch, full = results[f"pass_chunked_{n}"], results[f"pass_full_{n}"]
            print(
                f"{n:>8d} {ch['time']:>10.2f} {full['time']:>8.2f} {ch['extra_mib']:>18.0f} "
                f"{full['extra_mib']:>15.0f}"
            )
    with open(a.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(a.out + ".tmp", a.out)  # whole or not at all
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
