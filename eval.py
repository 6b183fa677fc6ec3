"""Score a model on GSM8K and MATH with the prompt and grader `aent.py` trains with.

    python eval.py --model Qwen/Qwen2.5-Math-1.5B             # GSM8K + MATH-500, Qwen protocol
    python eval.py --model runs/aent/final --benchmarks math500 --protocol aent
    python eval.py --model DIR --benchmarks my_problems.jsonl --limit 50

Protocols: `qwen` (the Qwen2.5-Math harness: greedy, 1 sample) and `aent` (the AEnt recipe's
validation: T = 0.6, top_p = 0.95, top_k = 20, 4 samples per problem). The prompt style and
completion length are the training run's for a checkpoint of aent.py (its args.json), else the
Qwen2.5-Math harness's system prompt and 2048 tokens. pass@1 is the mean accuracy over samples;
with n > 1 samples, pass@n is the fraction of problems with at least one correct sample.

Writes OUT/summary.json and OUT/predictions.jsonl (each problem's prompt, completions,
extracted answers, gold and verdicts) and prints a table, with MATH broken down by level and
subject.
"""

import argparse
import json
import os
import signal
import sys
import time

if __name__ == "__main__":  # Ctrl-C while the libraries import: exit quietly, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import torch

import aent
from grader import find_answer, grade
from support import cli, data, models, rundir

BENCHMARKS = data.HUB_DATASETS  # gsm8k, math500, math: loaded with split="test"
PROTOCOLS = {
    "qwen": dict(temperature=0.0, top_p=1.0, top_k=0, samples=1),
    "aent": dict(temperature=0.6, top_p=0.95, top_k=20, samples=4),  # the recipe's validation
}


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument(
        "--model",
        required=True,
        help="hub id, or a directory saved by aent.py (or any save_pretrained)",
    )
    p.add_argument(
        "--benchmarks",
        default="gsm8k,math500",
        help="comma-separated: gsm8k, math500, math (full MATH test), or .jsonl/.parquet paths",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="qwen",
        help="qwen: greedy, 1 sample; aent: T=0.6, top_p=0.95, top_k=20, 4 samples",
    )
    p.add_argument(
        "--temperature", type=float, help="override the protocol's temperature (0 = greedy)"
    )
    p.add_argument("--top-p", type=float, help="override the protocol's top_p")
    p.add_argument("--top-k", type=int, help="override the protocol's top_k (0: none)")
    p.add_argument("--samples", type=int, help="override the protocol's samples per problem")
    p.add_argument(
        "--prompt",
        choices=cli.PROMPTS,
        help="prompt style (aent.build_prompt); default: the training run's (args.json beside "
        "a checkpoint of aent.py), else qwen-math",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="completion length limit; default: the training run's, else 2048",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--limit", type=int, help="score only the first N problems of each benchmark")
    p.add_argument(
        "--grade-workers",
        type=int,
        default=0,
        help="grade in this many worker processes (0: in this process)",
    )
    p.add_argument(
        "--out-dir", default="runs/eval", help="directory for summary.json and predictions.jsonl"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    trained = training_settings(args.model)
    defaults = {**PROTOCOLS[args.protocol], "prompt": "qwen-math", "max_new_tokens": 2048}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key, value))
    if args.top_k < 0:
        p.error("--top-k must be 0 (none) or positive")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if (
        args.samples < 1
        or args.batch_size < 1
        or args.max_new_tokens < 1
        or (args.limit is not None and args.limit < 1)
    ):
        p.error("--samples, --batch-size, --max-new-tokens and --limit must be at least 1")
    if not args.temperature >= 0:  # NaN too
        p.error("--temperature must be 0 (greedy) or positive")
    if args.temperature == 0 and args.samples > 1:
        p.error(
            "greedy decoding (temperature 0) gives identical samples: use --samples 1 or a temperature > 0"
        )
    return args


def run_args(model: str) -> dict:
    """The settings of the aent.py run that saved checkpoint `model`: its run directory's
    args.json, one level up ({} for a hub id or a directory without one)."""
    path = os.path.join(os.path.dirname(os.path.normpath(model)), "args.json")
    if not os.path.isdir(model) or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def training_settings(model: str) -> dict:
    """The prompt style and completion length of the run that saved `model`, so a checkpoint is
    scored with the prompt it was trained on."""
    saved = run_args(model)
    return {k: saved[k] for k in ("prompt", "max_new_tokens") if k in saved}


def load_checkpoint(model: str, device: torch.device):
    """(model, tokenizer) of a hub id or a directory. A checkpoint of an aent.py LoRA run is its
    run's base with the checkpoint's adapter/, unmerged, as training ran it: the merged final/
    in bf16 (or under bf16 autocast) would round away much of the adapters' small update."""
    saved = run_args(model)
    if saved.get("lora_rank") and os.path.isdir(os.path.join(model, "adapter")):
        lora = {k: saved[k] for k in ("lora_rank", "lora_alpha") if k in saved}
        return models.load_policy(
            saved["model"], device, saved.get("seed", 0), **lora, resume=model
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return models.load_model(model, device, dtype=dtype)


def complete(model, tokenizer, prompts, gen, samples=1, batch_size=64, on_batch=None):
    """`samples` completions for every prompt, in prompt order. Prompts go longest first, so each
    `generate` call holds prompts of similar length; on_batch(n) reports progress."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    per_call = max(1, batch_size // samples)
    out = [None] * len(prompts)
    for j in range(0, len(order), per_call):
        idx = order[j : j + per_call]
        roll = aent.rollout(model, tokenizer, [prompts[i] for i in idx], gen, samples, batch_size)
        for k, i in enumerate(idx):
            out[i] = roll["completions"][k * samples : (k + 1) * samples]
        if on_batch:
            on_batch(len(idx))
    return out


def benchmark_list(spec: str) -> list[str]:
    """Validate benchmark names and files before any model is loaded."""
    names = [b.strip() for b in spec.split(",") if b.strip()]
    for b in names:
        if b not in BENCHMARKS and not b.endswith((".jsonl", ".parquet")):
            sys.exit(
                f"error: unknown benchmark {b!r}: use {', '.join(BENCHMARKS)}, or a .jsonl/.parquet file"
            )
        if b not in BENCHMARKS and not os.path.isfile(b):
            sys.exit(f"error: benchmark file {b} not found")
    if not names:
        sys.exit("error: --benchmarks is empty")
    return names


def _grade(pair):
    return grade(*pair)


def grade_all(pairs, workers: int) -> list[float]:
    """grade over (completion, gold) pairs, in worker processes when asked: math-verify's
    timeouts are signal-based and work only in a process's main thread, never in a thread pool."""
    if workers <= 0:
        return [grade(c, g) for c, g in pairs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_grade, pairs, chunksize=32))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def score(verdicts: list[list[float]]) -> dict:
    n = len(verdicts[0])
    out = {"n": len(verdicts), "pass@1": sum(sum(v) / n for v in verdicts) / len(verdicts)}
    if n > 1:
        out[f"pass@{n}"] = sum(pass_at_k(n, int(sum(v)), n) for v in verdicts) / len(verdicts)
    return out


def breakdown(problems, verdicts, key) -> dict:
    groups = defaultdict(list)
    for p, v in zip(problems, verdicts):
        if key in p:
            groups[p[key]].append(v)
    return {k: score(groups[k]) for k in sorted(groups)}


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    names = benchmark_list(args.benchmarks)
    rundir.claim_out_dir(args.out_dir)  # a bad --out-dir fails now, not after generating
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    benches = {b: data.load_problems(b, split="test")[: args.limit] for b in names}
    model, tokenizer = load_checkpoint(args.model, device)
    context = getattr(model.config, "max_position_embeddings", None)
    prompts_of = {
        name: [aent.build_prompt(tokenizer, p["question"], args.prompt) for p in problems]
        for name, problems in benches.items()
    }
    for name, prompts in prompts_of.items():
        longest = max(data.prompt_lengths(tokenizer, prompts, context)) if context else 0
        if context and longest + args.max_new_tokens > context:
            sys.exit(
                f"error: {name}: the longest prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's context of {context}"
            )
    eos_ids = models.stop_token_ids(model, tokenizer)
    gen = aent.generation_config(
        tokenizer, eos_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k
    )
    torch.manual_seed(args.seed)
    print(
        f"model {args.model} on {device} | protocol {args.protocol}: T={args.temperature}, "
        f"top_p={args.top_p}, top_k={args.top_k}, {args.samples} sample(s), "
        f"{args.max_new_tokens} new tokens, prompt {args.prompt}"
    )

    summary = {
        "model": args.model,
        "protocol": args.protocol,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "prompt": args.prompt,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "benchmarks": {},
    }
    predictions = []
    for name, problems in benches.items():
        prompts = prompts_of[name]
        t0 = time.time()
        bar = tqdm(total=len(prompts), desc=name, unit="problem", dynamic_ncols=True)
        completions = complete(
            model, tokenizer, prompts, gen, args.samples, args.batch_size, on_batch=bar.update
        )
        bar.close()
        gen_time = time.time() - t0
        pairs = [(c, p["gold"]) for cs, p in zip(completions, problems) for c in cs]
        flat = grade_all(pairs, args.grade_workers)
        verdicts = [flat[i * args.samples : (i + 1) * args.samples] for i in range(len(problems))]
        answers = [[find_answer(c) for c in cs] for cs in completions]  # (answer, where) each
        found = [where for pairs in answers for _, where in pairs]
        result = {
            **score(verdicts),
            "completions": len(found),
            "no_answer": found.count(None),  # nothing to grade: scored 0
            "unboxed": len(found) - found.count(None) - found.count("boxed"),
            "unboxed_correct": sum(v for v, f in zip(flat, found) if f not in (None, "boxed")),
            "generation_s": round(gen_time, 2),
            "problems_per_s": round(len(problems) / gen_time, 3),
            "grading_s": round(time.time() - t0 - gen_time, 2),
        }
        for key in ("level", "subject"):
            if any(key in p for p in problems):
                result[f"by_{key}"] = breakdown(problems, verdicts, key)
        summary["benchmarks"][name] = result
        rows = zip(problems, prompts, completions, verdicts, answers)
        for i, (p, prompt, cs, vs, pairs) in enumerate(rows):
            predictions.append(
                {
                    "benchmark": name,
                    "index": i,
                    **{k: p[k] for k in ("level", "subject") if k in p},
                    "prompt": prompt,
                    "completions": cs,
                    "answers": [answer for answer, _ in pairs],
                    "answer_from": [where for _, where in pairs],
                    "gold": p["gold"],
                    "verdicts": vs,
                }
            )

    rundir.write_atomic(
        os.path.join(args.out_dir, "predictions.jsonl"),
        "".join(json.dumps(r) + "\n" for r in predictions),
    )
    rundir.write_atomic(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=1))
    print_table(summary)
    print(f"wrote {args.out_dir}/summary.json and {args.out_dir}/predictions.jsonl")
    return summary


def print_table(summary):
    head = ("benchmark", "n", "pass@1", "pass@n", "problems/s", "no answer", "unboxed (correct)")
    rows = [head]
    for name, r in summary["benchmarks"].items():
        pass_n = next(
            (f"{v:.3f}" for k, v in r.items() if k.startswith("pass@") and k != "pass@1"), "-"
        )
        speed = f"{r['problems_per_s']:.2f}"
        found = (
            f"{r['no_answer']}/{r['completions']}",
            f"{r['unboxed']} ({r['unboxed_correct']:.0f})",
        )
        rows.append((name, str(r["n"]), f"{r['pass@1']:.3f}", pass_n, speed, *found))
        for key in ("by_level", "by_subject"):
            for group, s in r.get(key, {}).items():
                rows.append((f"  {group}", str(s["n"]), f"{s['pass@1']:.3f}", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )


if __name__ == "__main__":
    main()
