"""Checkpoints: step_NNNNNN/ and final/, each a model directory from_pretrained loads plus the
optimizer and trainer state. Written whole or not at all; on resume the newest intact one is
found, a damaged one passed over. Read with weights_only=True: no code runs from a checkpoint."""

import copy
import math
import os
import shutil
import sys
from typing import Optional

import torch

from support.distributed import all_sum, barrier, full_state, is_sharded, rank, world_size
from support.distributed import load_full_optimizer_state
from support.models import save_model, save_tokenizer, saved_model_problem, tokenizer_problem


def save_checkpoint(out_dir, model, tokenizer, optimizer, state: dict, keep_last: int, final=False):
    """Write step_NNNNNN/ (or final/): save_pretrained weights and tokenizer, optimizer.pt and
    trainer_state.pt. Written to NAME.tmp/, synced, and renamed, so a checkpoint is complete or
    absent; older step checkpoints beyond keep_last are deleted. Rank 0 alone writes.

    With LoRA (a peft model) the weights are the adapters, in adapter/; final/ also holds the
    merged model, a plain one, in fp32, since bf16 base weights would round away much of a
    small update. The model being trained is left as it was. A sharded model (--fsdp) is
    gathered whole to rank 0 first, every rank sending its shards: a plain checkpoint."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    if all_sum(not all(torch.isfinite(p).all() for p in local)) > 0:  # on any rank
        sys.exit(
            f"error: the weights are no longer finite after step {state['step']} (is --lr too "
            f"large?); nothing was saved ({last_checkpoint_note(out_dir)})"
        )
    from transformers.utils import logging

    logging.disable_progress_bar()  # the step bar is progress enough
    name = "final" if final else f"step_{state['step']:06d}"
    path = os.path.join(out_dir, name)
    plain = (None, optimizer.state_dict())  # a sharded model's: whole, keyed by parameter name
    weights, optimizer_state = full_state(model, optimizer) if is_sharded(model) else plain
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
            save_model(merged, tokenizer, tmp, weights)
        else:
            save_tokenizer(tokenizer, tmp)
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, files in os.walk(tmp):
            for f in files:  # safetensors writes 0600: every file readable as the rest are
                os.chmod(os.path.join(folder, f), 0o666 & ~umask)
                with open(os.path.join(folder, f), "rb") as fh:
                    os.fsync(fh.fileno())
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        full = shutil.disk_usage(out_dir).free < 2**20
        reason = "the disk is full" if full else getattr(e, "strerror", None) or str(e)[:120]
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(
            f"error: cannot write {path}: {reason}; nothing else was changed "
            f"({last_checkpoint_note(out_dir)}); rerun to resume from it once there is room"
        )
    if os.path.isdir(path):  # replace final/ without a moment where no complete copy exists
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    names = os.listdir(out_dir)
    steps = sorted(n for n in names if n.startswith("step_") and "." not in n)
    newer = math.inf if final else state["step"]
    set_aside = [n for n in names if n.endswith(".damaged") and damaged_step(n) <= newer]
    for n in steps[:-keep_last] + set_aside:  # renamed first: a kill mid-delete leaves a .tmp
        os.replace(os.path.join(out_dir, n), os.path.join(out_dir, n + ".tmp"))
        shutil.rmtree(os.path.join(out_dir, n + ".tmp"), ignore_errors=True)
    return barrier(path)


def damaged_step(name: str) -> float:
    """The step of a checkpoint set aside as NAME.damaged: a newer one makes it useless."""
    base = name.split(".")[0]
    return int(base[5:]) if base.startswith("step_") and base[5:].isdigit() else math.inf


def resume_point(out_dir: str):
    """(checkpoint, its trainer state) to resume the run in out_dir from, or (None, None)."""
    path = latest_checkpoint(out_dir, report=print)
    state = load_state(path) if path else None
    step = state["step"] if state else 0
    if all_sum(step) != step * world_size():
        sys.exit(f"error: the processes found different checkpoints in {out_dir}")
    return (path, state) if path else (None, None)


def restore(path: str, state: dict, model, optimizer):
    """Load the optimizer state of a checkpoint; (step, coef, bad_streak) to continue from. A
    sharded model's optimizer takes its shard of the whole state, saved by any number of ranks."""
    file = os.path.join(path, "optimizer.pt")
    if is_sharded(model):
        load_full_optimizer_state(model, optimizer, file)
    else:  # moves each state to its parameter's device
        optimizer.load_state_dict(torch.load(file, "cpu", weights_only=True))
    print(f"resuming from {path} (step {state['step']})")
    return state["step"], state["coef"], state["bad_streak"]


def load_state(path: str) -> Optional[dict]:
    """A checkpoint's trainer state, read without running any code (weights_only): a dict with
    an int step >= 0, a finite float coef >= 0 and an int bad_streak >= 0; None if it is
    damaged or anything else."""
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), "cpu", weights_only=True)
    except Exception:
        return None
    ints, coef = ("step", "bad_streak"), state.get("coef") if isinstance(state, dict) else None
    if not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        return None
    if not all(type(state.get(k)) is int and state[k] >= 0 for k in ints):
        return None
    return state


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
        step = int(name[5:]) if name.startswith("step_") else math.inf  # final: the newest
        if name == "final.old" and found and rank() == 0:  # a copy final/ replaced, half
            shutil.rmtree(path, ignore_errors=True)  # deleted by a kill: nothing to keep
            continue
        report(f"passing over the damaged checkpoint {path} ({problem})")
        if step > steps[found] and rank() == 0:  # out of the way of keep_last, which
            shutil.rmtree(path + ".damaged", ignore_errors=True)  # would keep it over a
            os.replace(path, path + ".damaged")  # good one; pruned by the next save
    return os.path.join(out_dir, found) if found else None


def stop_if_diverged(applied: list[bool], bad_streak: int, limit: int, out_dir: str) -> int:
    """The count of non-finite (skipped) updates in a row after these, each applied or not;
    at `limit` the run stops without saving, so the checkpoints keep the last finite weights."""
    for ok in applied:
        bad_streak = 0 if ok else bad_streak + 1
        if bad_streak >= limit:
            sys.exit(
                f"error: {bad_streak} updates in a row had a non-finite loss or gradient; "
                f"stopped without saving ({last_checkpoint_note(out_dir)})"
            )
    return bad_streak


def last_checkpoint_note(out_dir: str) -> str:
    path = latest_checkpoint(out_dir)
    return f"the last checkpoint is {path}" if path else "no checkpoint was written"
