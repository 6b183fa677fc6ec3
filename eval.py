"""Score a model on GSM8K and MATH with the prompt and grader `aent.py` trains with.

    python eval.py --model Qwen/Qwen2.5-Math-1.5B             # GSM8K + MATH-500, Qwen protocol
    python eval.py --model runs/aent/final --benchmarks math500 --protocol aent
    python eval.py --model DIR --benchmarks my_problems.jsonl --limit 50

Protocols: `qwen` (the Qwen2.5-Math harness: greedy, 1 sample) and `aent` (the AEnt recipes'
validation: T = 0.6, top_p = 0.95, 4 samples per problem, and top_k = 20 except for an
r1-distill run, whose recipe sets none). The prompt style and completion length are the training
run's for a checkpoint of aent.py (the args.json of its run), else the Qwen2.5-Math harness's
system prompt and 2048 tokens. pass@1 is the mean accuracy over samples; with n > 1 samples,
pass@n is the fraction of problems with at least one correct sample.

Writes OUT/predictions.jsonl as it goes (each problem's prompt, completions, extracted answers,
gold and verdicts), then OUT/summary.json, and prints a table, with MATH broken down by level and
subject. Interrupted (a signal, a crash, a full disk), the same command continues where it
stopped: problems already in predictions.jsonl are not redone.
"""

import argparse
import json
import os
import re
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
from support.signals import StopRequest

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
        "--out-dir",
        help="directory for predictions.jsonl and summary.json (default: runs/eval/MODEL-PROTOCOL)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    trained = training_settings(args.model)
    defaults = {**PROTOCOLS[args.protocol], "prompt": "qwen-math", "max_new_tokens": 2048}
    if args.protocol == "aent" and trained["r1"]:
        defaults["top_k"] = 0  # the r1-distill recipe validates without a top-k cut
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key, value))
    if not 0 <= args.seed < 2**32:
        p.error("--seed must be in [0, 2**32)")
    if args.out_dir is None:  # one directory per model and protocol: each can resume
        name = re.sub(r"[^\w.-]+", "_", os.path.normpath(args.model).strip("./"))
        args.out_dir = os.path.join("runs", "eval", f"{name}-{args.protocol}")
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
            "greedy decoding (temperature 0) gives identical samples: use --samples 1 or a "
            "temperature > 0"
        )
    return args


CHECKPOINT = re.compile(r"step_\d{6}|final")  # what aent.py names its checkpoints


def run_args(model: str) -> dict:
    """The settings of the aent.py run whose checkpoint `model` is (step_NNNNNN/ or final/, with
    its trainer state, in a run directory with args.json); {} for anything else."""
    folder = os.path.normpath(model)
    path = os.path.join(os.path.dirname(folder), "args.json")
    is_checkpoint = CHECKPOINT.fullmatch(os.path.basename(folder)) and os.path.isfile(
        os.path.join(folder, "trainer_state.pt")
    )
    if not is_checkpoint or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return saved if isinstance(saved, dict) else {}


def training_settings(model: str) -> dict:
    """The prompt style and completion length of the run that saved `model`, so a checkpoint is
    scored with the prompt it was trained on; and whether it is an r1-distill run."""
    saved = run_args(model)
    out = {k: saved[k] for k in ("prompt", "max_new_tokens") if k in saved}
    return {**out, "r1": saved.get("recipe") == "r1-distill"}


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
    return models.load_model(model, device, dtype=models.frozen_dtype(device))


def complete(model, tokenizer, prompts, gen, samples=1, batch_size=64):
    """`samples` completions for every prompt, in prompt order (see batches)."""
    out = [None] * len(prompts)
    for idx, completions in batches(model, tokenizer, prompts, gen, samples, batch_size):
        for i, c in zip(idx, completions):
            out[i] = c
    return out


def batches(model, tokenizer, prompts, gen, samples=1, batch_size=64):
    """(prompt indices, their `samples` completions each) per `generate` call. Prompts go longest
    first, so each call holds prompts of similar length."""
    if not prompts:  # all done already (the tokenizer refuses an empty batch)
        return
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    per_call = max(1, batch_size // samples)
    for j in range(0, len(order), per_call):
        idx = order[j : j + per_call]
        roll = aent.rollout(model, tokenizer, [prompts[i] for i in idx], gen, samples, batch_size)
        texts = roll["completions"]
        yield idx, [texts[k * samples : (k + 1) * samples] for k in range(len(idx))]


def benchmark_list(spec: str) -> list[str]:
    """Validate benchmark names and files before any model is loaded."""
    names = [b.strip() for b in spec.split(",") if b.strip()]
    for b in names:
        if b not in BENCHMARKS and not b.endswith((".jsonl", ".parquet")):
            sys.exit(
                f"error: unknown benchmark {b!r}: use {', '.join(BENCHMARKS)}, or a "
                ".jsonl/.parquet file"
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


SAME_EVALUATION = ("model", "protocol", "temperature", "top_p", "top_k", "samples", "prompt",
                   "max_new_tokens", "seed")  # fmt: skip


def previous_predictions(out_dir: str, settings: dict) -> dict:
    """{(benchmark, index): record} of an interrupted evaluation in out_dir with these settings
    (eval_args.json), its predictions.jsonl cut back to its whole records; {} for a new one."""
    path, predictions = (os.path.join(out_dir, n) for n in ("eval_args.json", "predictions.jsonl"))
    saved = run_file(path) if os.path.isfile(path) else None
    if saved is None and os.path.isfile(predictions):
        sys.exit(
            f"error: {out_dir} holds predictions of another evaluation; choose another --out-dir"
        )
    if saved is not None and saved != settings:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
                          for k, v in settings.items() if saved.get(k) != v)  # fmt: skip
        sys.exit(f"error: {out_dir} holds another evaluation ({diffs}); choose another --out-dir")
    done = {}
    if saved is not None and os.path.isfile(predictions):
        with open(predictions, encoding="utf-8", errors="replace") as f:
            for line in f:
                record = run_line(line)
                if record and len(record.get("verdicts", ())) == settings["samples"]:
                    done[record["benchmark"], record["index"]] = record
    return done


def start_predictions(out_dir: str, settings: dict, done: dict):
    """eval_args.json, and predictions.jsonl holding `done` alone (a line a crash cut short, or
    of another size, goes): once the model has loaded, before the first batch."""
    try:
        rundir.write_atomic(os.path.join(out_dir, "eval_args.json"), json.dumps(settings, indent=1))
        lines = "".join(json.dumps(r) + "\n" for r in done.values())
        rundir.write_atomic(os.path.join(out_dir, "predictions.jsonl"), lines)
    except OSError as e:
        sys.exit(f"error: cannot write to {out_dir}: {e.strerror}")


def run_file(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def run_line(line: str):
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # a line cut short
        return None
    ok = isinstance(record, dict) and isinstance(record.get("index"), int)
    return record if ok and isinstance(record.get("benchmark"), str) else None


def main(argv=None):
    args = parse_args(argv)
    names = benchmark_list(args.benchmarks)
    out, kept = args.out_dir, {}
    with StopRequest(out, note=lambda: f"{len(kept)} problems kept in {out}/predictions.jsonl; "
                     "rerun to continue") as stop:  # fmt: skip
        rundir.claim_out_dir(out)  # a bad --out-dir fails now, not after generating
        kept.update(previous_predictions(out, {k: getattr(args, k) for k in SAME_EVALUATION}))
        summary = evaluate(args, names, kept, stop)
    if summary:
        print_table(summary)
        print(f"wrote {out}/summary.json and {out}/predictions.jsonl")
    return summary


def evaluate(args, names, kept: dict, stop) -> dict:
    """Generate and grade what `kept` lacks, appending each batch to predictions.jsonl, then
    write summary.json; None if a signal stopped it first."""
    from tqdm import tqdm

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
                f"error: {name}: the longest prompt ({longest} tokens) + --max-new-tokens "
                f"({args.max_new_tokens}) exceeds the model's context of {context}"
            )
    eos_ids = models.stop_token_ids(model, tokenizer)
    gen = aent.generation_config(
        tokenizer, eos_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k
    )
    torch.manual_seed(args.seed)
    start_predictions(args.out_dir, {k: getattr(args, k) for k in SAME_EVALUATION}, kept)
    print(
        f"model {args.model} on {device} | protocol {args.protocol}: T={args.temperature}, "
        f"top_p={args.top_p}, top_k={args.top_k}, {args.samples} sample(s), "
        f"{args.max_new_tokens} new tokens, prompt {args.prompt}"
        + (f" | {len(kept)} problems already scored" if kept else "")
    )
    summary = {k: getattr(args, k) for k in SAME_EVALUATION if k != "seed"}
    summary["benchmarks"] = {}
    for name, problems in benches.items():
        prompts, t0, grading = prompts_of[name], time.time(), 0.0
        todo = [i for i in range(len(problems)) if (name, i) not in kept]
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=name,
                   unit="problem", dynamic_ncols=True)  # fmt: skip
        todo_prompts = [prompts[i] for i in todo]
        for idx, completions in batches(
            model, tokenizer, todo_prompts, gen, args.samples, args.batch_size
        ):
            t1 = time.time()
            rows = [(todo[j], cs) for j, cs in zip(idx, completions)]
            pairs = [(c, problems[i]["gold"]) for i, cs in rows for c in cs]
            flat = iter(grade_all(pairs, args.grade_workers))
            records = [record(name, i, problems[i], prompts[i], cs, flat) for i, cs in rows]
            append_predictions(args.out_dir, records)
            kept.update(((name, r["index"]), r) for r in records)
            grading += time.time() - t1
            bar.update(len(records))
            if stop.requested:
                bar.close()
                print(
                    f"stopped by {stop.requested}: {len(kept)} problems kept in "
                    f"{args.out_dir}/predictions.jsonl; rerun the same command to continue"
                )
                return None
        bar.close()
        done = [kept[name, i] for i in range(len(problems))]
        seconds = time.time() - t0 - grading
        summary["benchmarks"][name] = result(problems, done, len(todo), seconds, grading)
    try:
        path = os.path.join(args.out_dir, "summary.json")
        rundir.write_atomic(path, json.dumps(summary, indent=1))
    except OSError as e:
        sys.exit(f"error: cannot write {path}: {e.strerror}; the predictions are kept in "
                 f"{args.out_dir}/predictions.jsonl: rerun to write it")  # fmt: skip
    return summary


def record(benchmark, index, problem, prompt, completions, verdicts) -> dict:
    """One problem's line of predictions.jsonl; `verdicts` yields its completions' in order."""
    answers = [find_answer(c) for c in completions]  # (answer, where it came from) each
    return {
        "benchmark": benchmark,
        "index": index,
        **{k: problem[k] for k in ("level", "subject") if k in problem},
        "prompt": prompt,
        "completions": completions,
        "answers": [answer for answer, _ in answers],
        "answer_from": [where for _, where in answers],
        "gold": problem["gold"],
        "verdicts": [next(verdicts) for _ in completions],
    }


def append_predictions(out_dir: str, records: list[dict]):
    """Append records to predictions.jsonl, on disk before the next batch starts; a full disk is
    one line that says how much is kept (a line cut short is dropped on the next run)."""
    path = os.path.join(out_dir, "predictions.jsonl")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        sys.exit(f"error: cannot write {path}: {e.strerror}; the problems before these are "
                 "kept: rerun the same command to continue once there is room")  # fmt: skip


def result(problems, done, generated: int, seconds: float, grading: float) -> dict:
    """A benchmark's scores from its records, with this session's generation speed."""
    verdicts = [r["verdicts"] for r in done]
    flat = [v for vs in verdicts for v in vs]
    found = [where for r in done for where in r["answer_from"]]
    out = {
        **score(verdicts),
        "completions": len(found),
        "no_answer": found.count(None),  # nothing to grade: scored 0
        "unboxed": len(found) - found.count(None) - found.count("boxed"),
        "unboxed_correct": sum(v for v, f in zip(flat, found) if f not in (None, "boxed")),
        "generated_now": generated,
        "generation_s": round(seconds, 2),
        "problems_per_s": round(generated / seconds, 3) if generated and seconds else None,
        "grading_s": round(grading, 2),
    }
    for key in ("level", "subject"):
        if any(key in p for p in problems):
            out[f"by_{key}"] = breakdown(problems, verdicts, key)
    return out


def print_table(summary):
    head = ("benchmark", "n", "pass@1", "pass@n", "problems/s", "no answer", "unboxed (correct)")
    rows = [head]
    for name, r in summary["benchmarks"].items():
        pass_n = next(
            (f"{v:.3f}" for k, v in r.items() if k.startswith("pass@") and k != "pass@1"), "-"
        )
        speed = "-" if r["problems_per_s"] is None else f"{r['problems_per_s']:.2f}"
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
