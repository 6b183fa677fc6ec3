"""Run plumbing for aent.py, none of it part of the method: checks of flags and input files,
the run directory (resumable atomic checkpoints, logs, the same-run check), signals, and the
tiny model of the offline CPU demo."""

import argparse
import atexit
import copy
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import string
import struct
import sys
from typing import Optional

import torch
import torch.distributed as dist

from grader import last_boxed

BONUSES = ("none", "full", "clamped")  # --entropy: GRPO, the full-vocabulary bonus, AEnt
# ----------------------------------------------------------------------------------------------
# The CPU demo: a task and sizes where a randomly initialised model learns within minutes.
# Applied with --model tiny to every flag not given on the command line.
# ----------------------------------------------------------------------------------------------
TINY_DEMO = dict(
    dataset="toy", out_dir="runs/tiny", steps=150, prompts_per_step=16, group_size=16,
    max_prompt_tokens=64, max_new_tokens=2, mini_batch_prompts=8, micro_batch_size=128, lr=1e-3,
    weight_decay=0.0, entropy_coef=0.01, h_low=0.5, h_high=1.5, coef_lr=0.01, coef_min=0.001,
    coef_max=0.05, coef_warmup=5, save_every=0, logits_chunk=256,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The authors' published settings (their verl recipe), applied with --recipe NAME to every flag
# not given. Batch sizes are the recipe's own: 512 x 16 on 4 GPUs, 256 x 8 on 8.
# ----------------------------------------------------------------------------------------------
PROMPTS = ("qwen-math", "verl", "r1")  # --prompt: see aent.build_prompt
RECIPES = {
    "qwen-math": dict(
        model="Qwen/Qwen2.5-Math-1.5B", dataset="math", prompt="verl", steps=440,
        prompts_per_step=512, group_size=16, mini_batch_prompts=128, ppo_epochs=1, lr=2e-6,
        weight_decay=0.01, max_grad_norm=1.0, max_prompt_tokens=1024, max_new_tokens=3072,
        temperature=1.0, top_p=1.0, drop_frac=0.33, entropy_coef=0.002, h_low=0.15, h_high=0.24,
        coef_lr=0.002, coef_warmup=30, coef_min=0.0006, coef_max=0.009,
    ),
    "r1-distill": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", dataset="openr1", prompt="r1",
        prompts_per_step=256, group_size=8, mini_batch_prompts=64, ppo_epochs=1, lr=1e-6,
        weight_decay=0.01, max_grad_norm=1.0, max_prompt_tokens=1024, max_new_tokens=7168,
        temperature=1.0, top_p=1.0, drop_frac=0.25, entropy_coef=0.0003, h_low=0.35, h_high=0.62,
        coef_lr=1e-4, coef_warmup=156, coef_min=4e-5, coef_max=0.001,
    ),
}  # fmt: skip
HUB_DATASETS = {  # name: (hub id, config); --split picks train or test
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", None),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "openr1": ("open-r1/OpenR1-Math-220k", "default"),  # problem, answer; train split only
}


def load_problems(dataset: str, split: str = "train") -> list[dict]:
    """Problems {'question', 'gold'} from a hub dataset by name, a local .jsonl/.parquet file
    (rows with question or problem, and answer or a \\boxed{} in solution), or the toy task."""
    if dataset == "toy":  # the CPU demo's task: 'Repeat 7' -> '7'
        return [{"question": f"Repeat {d}", "gold": str(d)} for d in range(10)]
    return read_problems(dataset, split, HUB_DATASETS)


def build_tiny(seed: int = 0):
    """A randomly initialised 2-layer Qwen2 with a 99-token character-level tokenizer, offline.

    The tokenizer is a Qwen2Tokenizer (byte-level BPE without merges) over the printable ASCII
    characters, so a saved checkpoint reloads through AutoTokenizer unchanged. Characters
    outside that set are dropped.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    byte_level = [{" ": "\u0120", "\n": "\u010a"}.get(c, c) for c in chars]  # GPT-2's names
    vocab = {t: i for i, t in enumerate(specials + byte_level)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=specials[1:])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer


def confident_tiny_head(model):
    """The tiny model as a LoRA base. LoRA leaves the final norm and the (tied) head frozen, and
    at their random initialisation they cap the probability of any one digit at 3-4% (measured
    by optimising the last hidden state), so no adapter can make the demo's answer likely. A
    pretrained head has no such cap; scaling the final norm's weights from 1 to 10 lifts it."""
    with torch.no_grad():
        model.model.norm.weight.fill_(10.0)


def given_flags(fields, argv, description: str) -> dict:
    """{field: value} of the flags given on the command line: one flag per field of the
    dataclass `fields` (--no-X for booleans), its help from the field's metadata."""
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY_DEMO.items())
    epilog = f"With --model tiny, flags not given take the CPU demo's values: {demo}."
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=formatter
    )
    for f in dataclasses.fields(fields):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            kind = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help)
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def hold_out(pairs: list, size: int, seed: int):
    """(training pairs, `size` held-out pairs for --eval-every), a seeded split in data order."""
    if not size:
        return pairs, []
    if size >= len(pairs):
        sys.exit(f"error: --eval-size {size} must be below the {len(pairs)} problems")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = sorted(order[:size])
    return [pairs[i] for i in sorted(order[size:])], [pairs[i] for i in held_out]


def from_pretrained(name: str, dtype):
    """(model, tokenizer) with AutoModelForCausalLM and AutoTokenizer; a missing or damaged
    local directory, or a failed download, is one error line. A tokenizer without a pad token
    pads with EOS (the completion mask works by position, so that is safe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model {name!r}: {str(e).splitlines()[0]}")
    if tokenizer.pad_token_id is None:  # padding is needed for batches: EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Checks before anything loads: each problem is one line, `error: ...`, and nothing is written
# ----------------------------------------------------------------------------------------------
def check_args(args):
    """Refuse impossible or silently harmful settings before any long work starts."""
    problems = [
        f"--{f.name.replace('_', '-')} must be a finite number"
        for f in dataclasses.fields(args)
        if f.type is float and not math.isfinite(getattr(args, f.name))
    ]
    a = args
    rules = [
        ("group_size", a.group_size >= 2, "at least 2 (group advantages need a group)"),
        ("seed", 0 <= a.seed < 2**32, "in [0, 2**32)"),
        ("top_k", a.top_k is None or a.top_k >= 1, "at least 1"),
        ("temperature", a.temperature > 0, "positive for sampling"),
        ("top_p", 0 < a.top_p <= 1, "in (0, 1]"),
        ("lr", 0 < a.lr <= 1, "in (0, 1]"),
        ("weight_decay", a.weight_decay >= 0, "at least 0"),
        ("max_grad_norm", a.max_grad_norm > 0, "positive"),
        ("clip_low", 0 <= a.clip_low < 1, "in [0, 1)"),
        ("clip_high", a.clip_high >= 0, "at least 0"),
        ("dual_clip", a.dual_clip > 1, "above 1"),
        ("beta", a.beta >= 0, "at least 0"),
        ("lora_rank", a.lora_rank >= 0, "at least 0"),
        ("lora_alpha", a.lora_alpha > 0, "positive"),
        ("drop_frac", 0 <= a.drop_frac < 1, "in [0, 1)"),
        ("entropy_coef", a.entropy_coef >= 0, "at least 0"),
        ("coef_lr", a.coef_lr >= 0, "at least 0"),
        ("coef_min", 0 <= a.coef_min <= a.coef_max, "in [0, --coef-max]"),
        ("h_low", a.h_low <= a.h_high, "at most --h-high"),
        ("long_prompts", a.long_prompts in ("skip", "error"), "skip or error"),
        ("entropy", a.entropy in BONUSES, "one of " + ", ".join(BONUSES)),
        ("prompt", a.prompt in PROMPTS, "one of " + ", ".join(PROMPTS)),
    ]
    for name in ("steps", "prompts_per_step", "max_prompt_tokens", "max_new_tokens", "eval_size",
                 "rollout_batch_size", "mini_batch_prompts", "ppo_epochs", "micro_batch_size",
                 "logits_chunk", "keep_last", "max_bad_updates"):  # fmt: skip
        rules.append((name, getattr(a, name) >= 1, "at least 1"))
    for name in ("save_every", "sample_every", "eval_every", "coef_warmup"):
        rules.append((name, getattr(a, name) >= 0, "at least 0"))
    if a.mini_batch_prompts >= 1:
        divides = a.prompts_per_step % a.mini_batch_prompts == 0
        rules.append(("prompts_per_step", divides, "a multiple of --mini-batch-prompts"))
    world = world_size()  # torchrun's process count
    if world > 1:
        for name in ("prompts_per_step", "mini_batch_prompts"):
            splits = getattr(a, name) % world == 0
            rules.append((name, splits, f"a multiple of the {world} processes"))
    if a.entropy != "none" and a.adaptive_coef:
        inside = a.coef_min <= a.entropy_coef <= a.coef_max
        rules.append(("entropy_coef", inside, "in [--coef-min, --coef-max]"))
    problems += [f"--{n.replace('_', '-')} must be {what}" for n, ok, what in rules if not ok]
    if problems:
        sys.exit("error: " + "; ".join(dict.fromkeys(problems)))


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a .jsonl file; a bad line is an error."""
    rows = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8-sig"))
                except (ValueError, UnicodeDecodeError) as e:
                    sys.exit(f"error: {path} line {n}: not valid JSON ({str(e)[:80]})")
                if not isinstance(row, dict):
                    sys.exit(f"error: {path} line {n}: not a JSON object")
                rows.append((n, row))
    except OSError as e:
        sys.exit(f"error: cannot read {path}: {e.strerror}")
    return rows


def read_rows(dataset: str, split: str, hub: dict):
    """([(line number, row)], is_local) from a hub dataset by name or a .jsonl/.parquet file."""
    import datasets

    datasets.disable_progress_bars()
    if dataset in hub:
        name, config = hub[dataset]
        try:
            return list(enumerate(datasets.load_dataset(name, config, split=split), 1)), False
        except Exception as e:  # offline, unknown split, ...: the library raises many kinds
            sys.exit(f"error: cannot load {name} (split {split!r}): {str(e).splitlines()[0]}")
    if not dataset.endswith((".jsonl", ".parquet")):
        names = ", ".join(hub)
        sys.exit(f"error: unknown dataset {dataset!r}: use {names}, toy, or a .jsonl/.parquet file")
    if not os.path.isfile(dataset):
        sys.exit(f"error: dataset file {dataset} not found")
    if dataset.endswith(".jsonl"):
        return read_jsonl(dataset), True
    try:
        rows = datasets.load_dataset("parquet", data_files=dataset, split="train")
    except Exception as e:
        sys.exit(f"error: cannot read {dataset} as parquet: {str(e).splitlines()[0]}")
    return list(enumerate(rows, 1)), True


def problem_from_row(row: dict) -> Optional[dict]:
    """A dataset row -> {'question', 'gold'[, 'level', 'subject']}, or None if it lacks either.

    Gold is `answer` (GSM8K's '... #### 1,600' -> '1600'), else the last \\boxed{} of `solution`.
    """
    question, gold = row.get("question") or row.get("problem"), row.get("answer")
    if gold is not None and "####" in str(gold):
        gold = str(gold).split("####")[-1].replace(",", "")
    elif gold is None and row.get("solution"):
        gold = last_boxed(str(row["solution"]))
    if not str(question or "").strip() or not str(gold if gold is not None else "").strip():
        return None
    problem = {"question": str(question).strip(), "gold": str(gold).strip()}
    level, subject = row.get("level"), row.get("subject") or row.get("type")
    if level is not None:
        problem["level"] = f"Level {level}" if isinstance(level, int) else str(level)
    if subject:
        problem["subject"] = str(subject)
    return problem


def read_problems(dataset: str, split: str, hub: dict) -> list[dict]:
    """Problems from a hub dataset or a local file. A hub row without question or gold is
    skipped; in a local file it is an error that names the line."""
    rows, local = read_rows(dataset, split, hub)
    problems = []
    for n, row in rows:
        problem = problem_from_row(row)
        if problem is None and local:
            where = "line" if dataset.endswith(".jsonl") else "row"
            sys.exit(
                f"error: {dataset} {where} {n}: needs a question/problem and a gold answer "
                "(answer, or \\boxed{} in solution)"
            )
        problems += [problem] if problem else []
    if not problems:
        sys.exit(f"error: {dataset} has no rows with a question/problem and an answer/solution")
    return problems


def saved_model_problem(path: str, config="config.json", tokenizer=True) -> Optional[str]:
    """What keeps `from_pretrained` from loading directory `path` (None if nothing visible):
    a missing or damaged config (or adapter_config.json), no tokenizer, no weights, or a
    truncated .safetensors."""
    try:
        with open(os.path.join(path, config), "rb") as f:
            json.load(f)
    except OSError:
        if tokenizer and os.path.isdir(os.path.join(path, "adapter")):
            return "it holds LoRA adapters alone (adapter/); the run's final/ is a whole model"
        return f"it has no {config}"
    except ValueError:
        return f"its {config} is damaged"
    if tokenizer and (problem := tokenizer_problem(path)):
        return problem
    names = os.listdir(path)
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards and not any(n.endswith(".bin") for n in names):
        return "it has no weights (.safetensors)"
    for name in shards:
        if not safetensors_complete(os.path.join(path, name)):
            return f"its {name} is truncated or damaged"
    return None


def tokenizer_problem(path: str) -> Optional[str]:
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, f)) for f in tokenizer_files):
        return "it has no tokenizer (tokenizer.json); save one beside the model"
    return None


def safetensors_complete(path: str) -> bool:
    """A .safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: complete when the file ends where the last range does."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def check_model_path(name: str):
    """A local model directory must exist and hold a config, a tokenizer and complete weights."""
    if os.path.isdir(name):
        problem = saved_model_problem(name)
        if problem:
            sys.exit(f"error: cannot load model directory {name}: {problem}")
    elif name.startswith((".", "/", "~")) or os.path.exists(name):
        sys.exit(f"error: model directory {name} does not exist")


def prompt_lengths(tokenizer, prompts: list[str], limit: int) -> list[int]:
    """Token counts of prompts. A token spells at most `longest` characters, so a prompt of more
    than limit * longest characters is over the limit untokenized (counted as limit + 1): a
    50 MB line is refused at once instead of after minutes and gigabytes of tokenizing."""
    longest = max(map(len, tokenizer.get_vocab()))
    short = [i for i, p in enumerate(prompts) if len(p) <= limit * longest]
    counted = tokenizer([prompts[i] for i in short], add_special_tokens=False).input_ids
    lengths = [limit + 1] * len(prompts)
    for i, ids in zip(short, counted):
        lengths[i] = len(ids)
    return lengths


def check_prompt_lengths(lengths: list[int], context: Optional[int], args) -> list[int]:
    """Indices of the prompts that fit --max-prompt-tokens (the others are skipped with a count,
    or an error with --long-prompts error); prompt + --max-new-tokens must fit the context."""
    limit = args.max_prompt_tokens
    fits = [i for i, n in enumerate(lengths) if n <= limit]
    too_long = len(lengths) - len(fits)
    if too_long and (args.long_prompts == "error" or not fits):
        first = next(i for i, n in enumerate(lengths) if n > limit)
        sys.exit(
            f"error: {too_long} of {len(lengths)} prompts are longer than --max-prompt-tokens "
            f"{limit} (problem {first + 1} has {lengths[first]} tokens); raise the limit"
            + (" or pass --long-prompts skip" if fits else "")
        )
    if too_long:
        print(f"skipped {too_long} of {len(lengths)} prompts longer than {limit} tokens")
    longest = max(lengths[i] for i in fits)
    if context and longest + args.max_new_tokens > context:
        sys.exit(
            f"error: the longest prompt ({longest} tokens) + --max-new-tokens "
            f"({args.max_new_tokens}) exceeds the model's context of {context} tokens"
        )
    return fits


# ----------------------------------------------------------------------------------------------
# The run directory: args.json, metrics.jsonl, samples.jsonl, step_NNNNNN/ and final/
# ----------------------------------------------------------------------------------------------
RESUMABLE = ("out_dir", "steps", "save_every", "keep_last", "sample_every", "max_bad_updates")


def step_batch(n_problems: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices for a step: epochs of seeded permutations, a pure function of the step,
    so a resumed run sees the data an uninterrupted one would."""
    out, pos = [], step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(pos, n_problems)
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        take = torch.randperm(n_problems, generator=gen)[offset:][: prompts_per_step - len(out)]
        out += take.tolist()
        pos += len(take)
    return out


_claimed = {}  # real path of an out_dir -> (its locked .lock file, whether this created it)


def claim_out_dir(out_dir: str):
    """Create out_dir if needed (an error line if it cannot be written) and lock it for this
    process, so that a second run on it stops at once instead of interleaving its steps. The
    lock goes with the process, however it ends; a directory this left empty is removed."""
    real = os.path.realpath(out_dir)
    if real in _claimed or rank():  # rank 0 holds it for all ranks
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        sys.exit(f"error: --out-dir {out_dir} is a file, not a directory")
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {out_dir}: {e.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 16).decode(errors="replace").strip() or "?"
        os.close(fd)
        sys.exit(f"error: another run (pid {pid}) is using --out-dir {out_dir}; wait for it to end")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _claimed[real] = (fd, created)
    atexit.register(release_out_dir, out_dir)


def release_out_dir(out_dir: str):
    """Unlock out_dir; remove it if this process created it and wrote nothing there."""
    fd, created = _claimed.pop(os.path.realpath(out_dir), (None, False))
    if fd is None:
        return
    if created and set(os.listdir(out_dir)) <= {".lock"}:
        shutil.rmtree(out_dir, ignore_errors=True)
    os.close(fd)


def check_same_run(args):
    """An out_dir holds one run: resuming needs the same settings, bar the RESUMABLE ones."""
    out = args.out_dir
    path = os.path.join(out, "args.json")
    if not os.path.isfile(path):
        if os.path.isdir(out) and any(
            n == "metrics.jsonl" or n.startswith("step_") for n in os.listdir(out)
        ):
            sys.exit(
                f"error: {out} holds training output but no args.json; choose another --out-dir"
            )
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:
        sys.exit(f"error: {path} is damaged; choose another --out-dir")
    now = dataclasses.asdict(args)
    defaults = {f.name: f.default for f in dataclasses.fields(args)}  # a flag newer than the run
    changed = [k for k in now if k not in RESUMABLE and saved.get(k, defaults[k]) != now[k]]
    if changed:
        diffs = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:4]
        )
        sys.exit(
            f"error: {out} holds a different run ({diffs}); choose another --out-dir or use its settings"
        )


def load_state(path: str) -> Optional[dict]:
    """A checkpoint's trainer state, read without running any code (weights_only); None if damaged."""
    try:
        return torch.load(os.path.join(path, "trainer_state.pt"), "cpu", weights_only=True)
    except Exception:
        return None


def checkpoint_problem(path: str) -> Optional[str]:
    """What keeps a checkpoint directory from being resumed (None if nothing visible)."""
    if load_state(path) is None:
        return "its trainer_state.pt is missing or damaged"
    try:  # mapped to the CPU and the file memory-mapped: nothing lands on a GPU here
        torch.load(os.path.join(path, "optimizer.pt"), "cpu", mmap=True, weights_only=True)
    except Exception:
        return "its optimizer.pt is missing or damaged"
    adapter = os.path.join(path, "adapter")
    if os.path.isdir(adapter):  # LoRA: the adapters; beside them in final/, the merged model
        problem = saved_model_problem(adapter, "adapter_config.json", tokenizer=False)
        if problem or not os.path.basename(path).startswith("final"):
            return f"adapter/: {problem}" if problem else tokenizer_problem(path)
    return saved_model_problem(path)


def latest_checkpoint(out_dir: str, report=None) -> Optional[str]:
    """The intact checkpoint with the most steps in out_dir (step_*/, final/, or final.old/ left
    by a kill while final/ was replaced), if any. A damaged one is passed over (and reported);
    if every checkpoint is damaged, that is an error rather than a silent fresh start."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    names = [
        n for n in names if n.startswith("step_") and "." not in n or n in ("final", "final.old")
    ]
    states = {n: load_state(os.path.join(out_dir, n)) for n in names}
    steps = {n: s["step"] if isinstance(s, dict) else -1 for n, s in states.items()}
    found, damaged = None, []
    for name in sorted(names, key=steps.get, reverse=True):
        problem = checkpoint_problem(os.path.join(out_dir, name))
        if problem:
            damaged.append((name, problem))
        found = found or (None if problem else name)
    if report and damaged and not found:
        listed = "; ".join(f"{os.path.join(out_dir, n)} ({problem})" for n, problem in damaged)
        sys.exit(f"error: no checkpoint in {out_dir} can be resumed: {listed}")
    for name, problem in damaged if report else []:
        path = os.path.join(out_dir, name)
        report(f"passing over the damaged checkpoint {path} ({problem})")
        step = int(name[5:]) if name.startswith("step_") else math.inf  # final: the newest
        if step > steps[found] and rank() == 0:  # out of the way of --keep-last, which
            shutil.rmtree(path + ".damaged", ignore_errors=True)  # would keep it over a
            os.replace(path, path + ".damaged")  # good one; an older one is pruned in turn
    return os.path.join(out_dir, found) if found else None


def resume_point(args):
    """(checkpoint, its trainer state) to resume this run from, or (None, None) for a new run.
    Locks out_dir for this process first."""
    claim_out_dir(args.out_dir)
    check_same_run(args)
    path = latest_checkpoint(args.out_dir, report=print)
    state = load_state(path) if path else None
    step = state["step"] if state else 0
    if all_sum(step) != step * world_size():
        sys.exit(f"error: the processes found different checkpoints in {args.out_dir}")
    return (path, state) if path else (None, None)


def restore(path: str, state: dict, optimizer):
    """Load the optimizer state of a checkpoint; (step, coef, bad_streak) to continue from."""
    saved = torch.load(os.path.join(path, "optimizer.pt"), "cpu", weights_only=True)
    optimizer.load_state_dict(saved)  # moves each state to its parameter's device
    print(f"resuming from {path} (step {state['step']})")
    return state["step"], state["coef"], state["bad_streak"]


def write_atomic(path: str, text: str):
    """Whole or not at all: a temporary file, flushed to disk, then renamed."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def start_logs(args, step: int):
    """Write args.json and cut the logs back to `step`: a resumed run logs each step once."""
    if rank():
        return
    try:
        for name in os.listdir(args.out_dir):  # left by a run killed mid-write
            path = os.path.join(args.out_dir, name)
            if name.endswith(".tmp"):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        settings = json.dumps(dataclasses.asdict(args), indent=1)
        write_atomic(os.path.join(args.out_dir, "args.json"), settings)
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = os.path.join(args.out_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    kept = [line for line in f if logged_step(line) <= step]
                write_atomic(path, "".join(kept))
    except OSError as e:
        sys.exit(f"error: cannot write to {args.out_dir}: {e.strerror}; nothing was trained")


def logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return math.inf


def log_step(args, metrics: dict, completions, prompts, golds, rewards, write=print):
    """Append a step to metrics.jsonl and print a line about it. On the first and last step and
    every --sample-every steps, the first completion of 3 groups goes to samples.jsonl."""
    if rank():
        return
    append(args.out_dir, "metrics.jsonl", [json.dumps(metrics) + "\n"])
    m, G = metrics, args.group_size
    write(
        f"step {m['step']:>4} | reward {m['reward']:.3f} | H~ {m['entropy_clamped']:.3f} "
        f"H {m['entropy_full']:.3f} | coef {m['entropy_coef']:.4g} | clip {m['clip_frac']:.3f} | "
        f"len {m['response_len']:.0f} | {m['step_time']:.1f}s"
        + (f" | held-out accuracy {m['eval_accuracy']:.3f}" if "eval_accuracy" in m else "")
    )
    step, every = m["step"], args.sample_every
    if not every or (step % every and step not in (1, args.steps)):
        return
    samples = [
        {"step": step, "prompt": prompts[j // G], "completion": completions[j], "gold": golds[j],
         "reward": float(rewards[j])}
        for j in range(0, min(len(completions), 3 * G), G)
    ]  # fmt: skip
    append(args.out_dir, "samples.jsonl", [json.dumps(s) + "\n" for s in samples])
    for s in samples[:2]:
        write(f"  sample (reward {s['reward']:.0f}, gold {s['gold']}): {s['completion'][:200]!r}")


def append(out_dir: str, name: str, lines: list[str]):
    """Append lines to a log; a full disk or lost permission ends the run with one line (a
    line cut short is dropped on resume)."""
    try:
        with open(os.path.join(out_dir, name), "a", encoding="utf-8") as f:
            f.writelines(lines)
    except OSError as e:
        sys.exit(f"error: cannot write {name}: {e.strerror}; {last_checkpoint_note(out_dir)}")


def stop_if_diverged(bad_streak: int, args):
    """--max-bad-updates non-finite updates in a row end the run, without a checkpoint."""
    if bad_streak >= args.max_bad_updates:
        sys.exit(
            f"error: {bad_streak} updates in a row had a non-finite loss or gradient; stopped "
            f"without saving ({last_checkpoint_note(args.out_dir)})"
        )


def save_checkpoint(args, model, tokenizer, optimizer, state: dict, final: bool = False) -> str:
    """Write step_NNNNNN/ (or final/): save_pretrained weights and tokenizer, optimizer.pt and
    trainer_state.pt. Written to NAME.tmp/, synced, and renamed, so a checkpoint is complete or
    absent; older step checkpoints beyond --keep-last are deleted. Rank 0 alone writes.

    With LoRA (a peft model) the weights are the adapters, in adapter/; final/ also holds the
    merged model, a plain one, in fp32, since bf16 base weights would round away much of a
    small update. The model being trained is left as it was."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        sys.exit(
            f"error: the weights are no longer finite after step {state['step']} (is --lr too "
            f"large?); nothing was saved ({last_checkpoint_note(args.out_dir)})"
        )
    from transformers.utils import logging

    logging.disable_progress_bar()  # the step bar is progress enough
    name = "final" if final else f"step_{state['step']:06d}"
    path = os.path.join(args.out_dir, name)
    if rank():  # rank 0 writes for all (the weights are the same on every rank); the others
        return barrier(path)  # wait for it, so that no process runs ahead or exits first
    tmp, old = path + ".tmp", path + ".old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        lora = hasattr(model, "get_base_model")  # a peft model
        if lora:
            model.save_pretrained(os.path.join(tmp, "adapter"))
        if final or not lora:  # with LoRA: the adapters merged into an fp32 copy on the CPU
            merged = (
                copy.deepcopy(model).to("cpu", torch.float32).merge_and_unload() if lora else model
            )
            merged.save_pretrained(tmp)
            add_legacy_rope_theta(tmp)
        save_tokenizer(tokenizer, tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        for folder, _, files in os.walk(tmp):
            for f in files:
                with open(os.path.join(folder, f), "rb") as fh:
                    os.fsync(fh.fileno())
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        full = shutil.disk_usage(args.out_dir).free < 2**20
        reason = "the disk is full" if full else getattr(e, "strerror", None) or str(e)[:120]
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(
            f"error: cannot write {path}: {reason}; nothing else was changed "
            f"({last_checkpoint_note(args.out_dir)}); rerun to resume from it once there is room"
        )
    if os.path.isdir(path):  # replace final/ without a moment where no complete copy exists
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    steps = sorted(n for n in os.listdir(args.out_dir) if n.startswith("step_") and "." not in n)
    for n in steps[: -args.keep_last]:  # renamed first: a kill mid-delete leaves only a .tmp
        os.replace(os.path.join(args.out_dir, n), os.path.join(args.out_dir, n + ".tmp"))
        shutil.rmtree(os.path.join(args.out_dir, n + ".tmp"), ignore_errors=True)
    return barrier(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja")  # fmt: skip


def save_tokenizer(tokenizer, path: str):
    """Copy the files the tokenizer was loaded from, as they were: training never changes it, and
    transformers 4.x (the Qwen2.5-Math harness, many vLLM builds) cannot read the
    tokenizer_config.json that transformers 5 writes. A tokenizer built in memory (the tiny
    demo) is written by save_pretrained."""
    source = tokenizer.name_or_path
    if source and not os.path.isdir(source):  # a hub id: its files in the local cache
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "tokenizer_config.json", local_files_only=True)
            source = os.path.dirname(found) if found else None
        except Exception:
            source = None
    files = [os.path.join(source, f) for f in TOKENIZER_FILES] if source else []
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return tokenizer.save_pretrained(path)
    for f in files:
        shutil.copyfile(f, os.path.join(path, os.path.basename(f)))


def add_legacy_rope_theta(path: str):
    """transformers 5 writes rope_theta inside rope_parameters; 4.x reads only a top-level
    rope_theta and would silently use 10000. Write both."""
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


def last_checkpoint_note(out_dir: str) -> str:
    path = latest_checkpoint(out_dir)
    return f"the last checkpoint is {path}" if path else "no checkpoint was written"


# ----------------------------------------------------------------------------------------------
# Data parallel under torchrun: each rank samples its share of the step's groups; these helpers
# sum across ranks (and are the identity in a single process). gloo on CPU, nccl on GPUs.
# ----------------------------------------------------------------------------------------------
_DEVICE = None  # where this rank's collectives run


def init_distributed():
    """(rank, world size, device). Under torchrun, joins the process group; ranks other than 0
    print nothing (rank 0 logs and saves for all)."""
    global _DEVICE
    world = world_size()
    cuda = torch.cuda.is_available()
    if world == 1:
        _DEVICE = torch.device("cuda" if cuda else "cpu")
        return 0, 1, _DEVICE
    _DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(_DEVICE)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)  # before exit: no abort in gloo's threads
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's
    return dist.get_rank(), world, _DEVICE


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun for every process


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_sum(x) -> torch.Tensor:
    """x (a number or a 0-d tensor) summed over ranks, as a float64 tensor."""
    t = torch.as_tensor(x, dtype=torch.float64, device=_DEVICE or "cpu").detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t ([n, ...], the same n on each), concatenated in rank order."""
    if not dist.is_initialized():
        return t
    t = t.to(_DEVICE).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def sum_gradients(model):
    """Sum each gradient over ranks (what DistributedDataParallel does, bucketed and overlapped
    with the backward): each rank weighted its tokens by the global count, so the sum is the
    token-mean gradient of the whole minibatch."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a rank whose micro-batches were all empty
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def barrier(value=None):
    """Wait for every rank; returns value."""
    if dist.is_initialized():
        dist.barrier()
    return value


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a step's sampling and shuffling on a rank: a function of the three, so that a
    resumed run draws what an uninterrupted one on the same number of ranks would."""
    return (seed * 1_000_003 + step) * 4096 + rank


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
class StopRequest:
    """Inside `with StopRequest(out_dir) as stop:`, SIGINT, SIGTERM and SIGHUP set
    stop.requested: the training loop finishes its step, writes a checkpoint and returns. A
    second Ctrl-C stops at once, leaving the checkpoints as they were. Leaving the block
    releases the lock on out_dir that `resume_point` took."""

    requested = None

    def __init__(self, out_dir: Optional[str] = None):
        self.out_dir = out_dir

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # an ignored one (nohup) stays so
        self.previous = {s: signal.getsignal(s) for s in signals}
        for s in signals:
            if self.previous[s] is not signal.SIG_IGN:
                signal.signal(s, self.handle)
        return self

    def __exit__(self, kind, value, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.out_dir:
            release_out_dir(self.out_dir)
        if kind is SystemExit and isinstance(value.code, str) and rank():
            raise SystemExit(1)  # rank 0 says it
        if kind is KeyboardInterrupt:
            note = last_checkpoint_note(self.out_dir) if self.out_dir else "nothing was saved"
            sys.exit(f"interrupted ({note})")

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
