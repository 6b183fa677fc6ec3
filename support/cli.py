"""The command line of aent.py: the authors' published settings (--recipe), the flags and their
--help (one per field of aent.Args), and the checks that refuse an impossible or silently
harmful setting in one line before anything loads."""

import argparse
import dataclasses
import math
import sys
from typing import Optional

from support.dashboards import REPORTS, check_installed  # noqa: F401 (REPORTS: aent.Args)
from support.demo import TINY_DEMO
from support.distributed import rank, world_size

BONUSES = ("none", "full", "clamped")  # --entropy: GRPO, the full-vocabulary bonus, AEnt
PROMPTS = ("qwen-math", "verl", "r1")  # --prompt: see aent.build_prompt

# The authors' published settings (their verl recipe), applied with --recipe NAME to every flag
# not given. Batch sizes are the recipe's own: 512 x 16 on 4 GPUs, 256 x 8 on 8. Steps as they
# ran: 30 epochs x 14 (verl drops each epoch's last partial batch) and 6 x 156. Their OpenR1
# preprocessing appends the same instruction as their MATH one: the verl prompt for both.
RECIPES = {
    "qwen-math": dict(
        model="Qwen/Qwen2.5-Math-1.5B", dataset="math", prompt="verl", steps=420,
        prompts_per_step=512, group_size=16, mini_batch_prompts=128, ppo_epochs=1, lr=2e-6,
        weight_decay=0.01, max_grad_norm=1.0, max_prompt_tokens=1024, max_new_tokens=3072,
        temperature=1.0, top_p=1.0, drop_frac=0.33, entropy_coef=0.002, h_low=0.15, h_high=0.24,
        coef_lr=0.002, coef_warmup=30, coef_min=0.0006, coef_max=0.009,
    ),
    "r1-distill": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", dataset="openr1", prompt="verl",
        steps=936, prompts_per_step=256, group_size=8, mini_batch_prompts=64, ppo_epochs=1, lr=1e-6,
        weight_decay=0.01, max_grad_norm=1.0, max_prompt_tokens=1024, max_new_tokens=7168,
        temperature=1.0, top_p=1.0, drop_frac=0.25, entropy_coef=0.0003, h_low=0.35, h_high=0.62,
        coef_lr=1e-4, coef_warmup=156, coef_min=4e-5, coef_max=0.001,
    ),
}  # fmt: skip


def parse_args(fields, argv, description: str):
    """An instance of the dataclass `fields` (aent.Args) from the command line. Flags not given
    take TINY_DEMO's values with --model tiny, else a recipe's with --recipe, else their
    defaults. With --lora-rank and no --lr, the lr is 10x: LoRA's best rate is about 10x full
    fine-tuning's at alpha 32, whatever the rank ("LoRA Without Regret", Schulman et al. 2025);
    the tiny demo keeps its own, measured one."""
    given = given_flags(fields, argv, description)
    if given.get("model") == "tiny" and "recipe" in given:
        sys.exit("error: --recipe sets a real model's run; --model tiny takes the CPU demo's")
    recipe = RECIPES.get(given.get("recipe"), {})
    preset = TINY_DEMO if given.get("model") == "tiny" else recipe
    args = fields(**{**preset, **given})
    if args.lora_rank and "lr" not in given and args.model != "tiny":
        args.lr = round(args.lr * 10, 12)
    note_unused(args, given)
    return args


BAND = ("h_low", "h_high", "coef_lr", "coef_min", "coef_max", "coef_warmup")


def note_unused(args, given: dict):
    """A line for flags given that this configuration does not use (a run still starts)."""
    unused = {
        "with --entropy none": ("entropy_coef", "adaptive_coef", *BAND),
        "with --entropy full, which keeps every token": ("drop_frac", "keep_top_k"),
        "with --no-adaptive-coef": BAND,
        "without --lora-rank": ("lora_alpha",),
    }
    applies = [args.entropy == "none", args.entropy == "full", not args.adaptive_coef,
               not args.lora_rank]  # fmt: skip
    for (why, names), yes in zip(unused.items(), applies):
        flags = [f"--{n.replace('_', '-')}" for n in names if n in given]
        if yes and flags and not rank():  # one note under torchrun
            print(
                f"note: {', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {why}"
            )
            given = {k: v for k, v in given.items() if k not in names}


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


def check_args(args):
    """Refuse impossible or silently harmful settings before any long work starts: each problem
    is one line, `error: ...`, and nothing is written."""
    problems = [
        f"--{f.name.replace('_', '-')} must be a finite number"
        for f in dataclasses.fields(args)
        if f.type is float and not math.isfinite(getattr(args, f.name))
    ]
    a = args
    rules = [
        ("group_size", a.group_size >= 2, "at least 2 (group advantages need a group)"),
        ("seed", 0 <= a.seed < 2**32, "in [0, 2**32)"),
        ("keep_top_k", a.keep_top_k is None or a.keep_top_k >= 1, "at least 1"),
        ("temperature", a.temperature > 0, "positive for sampling"),
        ("top_p", 0 < a.top_p <= 1, "in (0, 1]"),
        ("lr", 0 < a.lr <= 1, "in (0, 1]"),
        ("weight_decay", 0 <= a.weight_decay <= 1, "in [0, 1]"),
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
        ("report_to", a.report_to in REPORTS, "one of " + ", ".join(REPORTS)),
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
    if a.fsdp and world < 2:
        problems.append("--fsdp shards over processes: run it under torchrun with 2 or more")
    if a.fsdp and a.lora_rank:  # LoRA under FSDP (peft, its reference, its checkpoints): not built
        problems.append("--fsdp shards full fine-tuning; with --lora-rank leave it out")
    if problems:
        sys.exit("error: " + "; ".join(dict.fromkeys(problems)))
    check_installed(a.report_to)  # the dashboard's package
