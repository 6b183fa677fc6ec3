"""The paper's argument in a language model on a laptop: an entropy bonus over a 151,936-token
vocabulary spreads probability over implausible tokens; a small kept set, or the adaptive
coefficient's band, is what stops it.

The set-up (our design; CPU, offline):
  - Model: the CPU demo's 2-layer, 64-wide Qwen2 with its vocabulary padded to Qwen2.5's 151,936
    by filler tokens that decode to letters, never to a digit (support/demo.py).
  - Warm start, one per seed, standing in for pretraining: 110 steps of supervised training on
    the task ('Repeat 7' -> '7', EOS; WARM_START), after which about 98% of the next-token
    probability sits on the ten digits and about 20% on the right one (printed as it finishes).
  - Then 30 steps of RL through aent.py on the same task: 8 prompts x 16 completions of one token
    (the digit), one update a step, lr 1e-3, the same seeds and lambda_0 = 0.2 for every method:
      grpo     --entropy none
      full     --entropy full --no-adaptive-coef                 (-lambda H over the vocabulary)
      clamped  --entropy clamped --no-adaptive-coef              (the recipe's p = 0.33)
      top10    --entropy clamped --keep-top-k 10 --no-adaptive-coef
      aent     --entropy clamped, lambda adapted in [0.002, 0.2] to keep H~ in [0.5, 2.2] nats,
               step eta = 0.1, from the first step (p = 0.33)
  - Logged per step (metrics.jsonl): reward, H, H~ and dropped_mass, the probability outside the
    kept set (grpo's is the p = 0.33 set it does not train on; full keeps everything: 0).

    python vocab_demo.py                              # 5 methods x 3 seeds, about 12 min on 2 cores
    python vocab_demo.py --methods aent --seeds 0     # one run: about a minute

Runs go to --out-dir (warm-s0/, aent-s0/, ...): a finished run is not redone, a warm start is
reused. Writes results.json there and the figure (--figure).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import aent
from support import demo, models

RL = ["--dataset", "toy", "--prompts-per-step", "8", "--group-size", "16",
      "--mini-batch-prompts", "8", "--micro-batch-size", "128", "--max-new-tokens", "1",
      "--max-prompt-tokens", "64", "--lr", "1e-3", "--weight-decay", "0", "--save-every", "0",
      "--sample-every", "0", "--logits-chunk", "32"]  # fmt: skip
FIXED = ["--entropy-coef", "0.2", "--no-adaptive-coef"]
METHODS = {
    "grpo": ["--entropy", "none"],
    "full": ["--entropy", "full", *FIXED],
    "clamped": ["--entropy", "clamped", *FIXED],
    "top10": ["--entropy", "clamped", "--keep-top-k", "10", *FIXED],
    "aent": ["--entropy", "clamped", "--entropy-coef", "0.2", "--coef-min", "0.002",
             "--coef-max", "0.2", "--h-low", "0.5", "--h-high", "2.2", "--coef-lr", "0.1",
             "--coef-warmup", "0"],
}  # fmt: skip
COLORS = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
PANELS = [("reward", "reward"), ("entropy_full", "H, full vocabulary (nats)"),
          ("entropy_clamped", "H~, kept set (nats)"),
          ("dropped_mass", "probability outside the kept set"), ("entropy_coef", "lambda")]  # fmt: skip


# Supervised phases of the warm start: (fraction of answers that are right, steps, lr). Copying
# first, then answers right 30% of the time at a lower lr: the mass settles on the digits while
# the model stays right only some of the time, as a pretrained model on a task it half knows.
WARM_START = [(1.0, 90, 3e-3), (0.3, 20, 1e-3)]


def warm_start(seed: int, path: str, phases=WARM_START, batch: int = 32):
    """Supervised training of build_tiny_vocab(seed) on the task, saved to `path` (reused if it
    is already there). Cross-entropy on the answer digit and the EOS after it, a wrong answer a
    random digit; the logits are taken at those two positions only."""
    if os.path.isdir(path) and not models.saved_model_problem(path):
        return path
    model, tokenizer = demo.build_tiny_vocab(seed)
    problems = demo.toy_problems()
    prompts = [aent.build_prompt(tokenizer, p["question"]) for p in problems]
    answers = [tokenizer(p["gold"], add_special_tokens=False).input_ids for p in problems]
    rows = [tokenizer(q, add_special_tokens=False).input_ids for q in prompts]
    rows = torch.tensor([r + a + [tokenizer.eos_token_id] for r, a in zip(rows, answers)])
    gen = torch.Generator().manual_seed(seed)
    for right, steps, lr in phases:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):  # every prompt has the same length: no padding
            ids = rows[torch.randint(0, len(rows), (batch,), generator=gen)]  # [b, L]
            wrong = torch.rand(batch, generator=gen) > right
            ids[wrong, -2] = rows[torch.randint(0, 10, (int(wrong.sum()),), generator=gen), -2]
            hidden = model.model(input_ids=ids).last_hidden_state[:, -3:-1]  # [b, 2, D]
            logits = model.lm_head(hidden).float()  # [b, 2, V]
            F.cross_entropy(logits.flatten(0, 1), ids[:, -2:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        probs = model.lm_head(model.model(input_ids=rows).last_hidden_state[:, -3]).softmax(-1)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    right = probs[torch.arange(10), torch.tensor(digits)].mean()
    print(f"warm start, seed {seed}: {probs[:, digits].sum(-1).mean():.1%} of the probability "
          f"on the digits, {right:.1%} on the right one")  # fmt: skip
    models.save_model(model, tokenizer, path)
    return path


def run(method: str, seed: int, out_dir: str, steps: int) -> list[dict]:
    """One RL run of aent.py from the warm start of `seed`; its metrics, one dict per step."""
    model = warm_start(seed, os.path.join(out_dir, f"warm-s{seed}"))
    run_dir = os.path.join(out_dir, f"{method}-s{seed}")
    flags = [*RL, "--steps", str(steps), *METHODS[method], "--seed", str(seed)]
    aent.train(aent.parse_args(["--model", model, *flags, "--out-dir", run_dir]))
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summary(runs: dict) -> dict:
    """Per method: mean and spread over seeds of the last 5 steps' reward, and the last step's
    H, H~ (None where nothing is clamped), dropped mass and lambda."""
    out = {}
    for method, per_seed in runs.items():
        final = {k: [ms[-1][k] for ms in per_seed] for k, _ in PANELS[1:]}
        last5 = [statistics.mean(m["reward"] for m in ms[-5:]) for ms in per_seed]
        first5 = [statistics.mean(m["reward"] for m in ms[:5]) for ms in per_seed]
        out[method] = {"reward_first5": first5, "reward_last5": last5, **final}
    return out


def plot(runs: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for method, per_seed in runs.items():
            rows = [[m[key] for m in ms] for ms in per_seed]
            if any(v is None for row in rows for v in row):
                continue  # full: nothing clamped
            values = torch.tensor(rows)  # [seeds, steps]
            steps = range(1, values.size(1) + 1)
            ax.plot(steps, values.mean(0), label=method, color=COLORS[method])
            low, high = values.min(0).values, values.max(0).values
            ax.fill_between(steps, low, high, alpha=0.15, color=COLORS[method])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"151,936-token vocabulary: mean over {len(rows)} seeds, band min to max")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="which methods to run")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds to run")
    p.add_argument("--steps", type=int, default=30, help="RL steps per run")
    p.add_argument("--out-dir", default="runs/vocab_demo", help="runs and results.json")
    p.add_argument("--figure", default="docs/vocab_demo.png", help="the PNG to draw")
    a = p.parse_args(argv)
    if a.steps < 1 or any(s < 0 for s in a.seeds):
        p.error("--steps must be at least 1 and seeds at least 0")
    t0 = time.time()
    runs = {m: [run(m, s, a.out_dir, a.steps) for s in a.seeds] for m in a.methods}
    results = summary(runs)
    print(f"\n{len(a.seeds)} seed(s), {a.steps} steps, {time.time() - t0:.0f} s; mean over seeds:")
    print(
        f"{'':9s}{'reward 1-5':>11s}{'last 5':>8s}{'H':>7s}{'H~':>7s}{'dropped':>9s}{'lambda':>8s}"
    )
    for method, r in results.items():
        cells = [statistics.mean(r["reward_first5"]), statistics.mean(r["reward_last5"])]
        cells += [statistics.mean(r[k]) if None not in r[k] else None for k, _ in PANELS[1:]]
        print(f"{method:9s}" + "".join(
            f"{'-' if v is None else f'{v:.3f}':>{w}s}" for v, w in zip(cells, (11, 8, 7, 7, 9, 8))
        ))  # fmt: skip
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": vars(a), "summary": results, "runs": runs}, f)
    if os.path.dirname(a.figure):
        os.makedirs(os.path.dirname(a.figure), exist_ok=True)
    plot(runs, a.figure)
    print(f"wrote {a.out_dir}/results.json and {a.figure}")
    return results


if __name__ == "__main__":
    main()
