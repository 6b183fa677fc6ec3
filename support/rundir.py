"""The run directory (--out-dir): a lock, so that one run writes it at a time; args.json, the
settings a resumed run must share; and the logs, metrics.jsonl and samples.jsonl, cut back to
the checkpoint's step on resume so that every step is logged once."""

import atexit
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import sys

from support.checkpoints import last_checkpoint_note
from support.dashboards import Dashboard
from support.distributed import rank

RESUMABLE = ("out_dir", "steps", "save_every", "keep_last", "sample_every", "max_bad_updates",
             "report_to")  # fmt: skip
RENAMED = {"top_k": "keep_top_k"}  # flags renamed since a run was saved: old name -> new

_claimed = {}  # real path of an out_dir -> (its locked .lock file, whether this created it)
_dashboard = None  # the live report of this process's run, if any


def claim(out_dir: str, settings: dict, defaults: dict):
    """Lock out_dir for this run (claim_out_dir) and check that it holds this run, or none
    (check_same_run)."""
    claim_out_dir(out_dir)
    check_same_run(out_dir, settings, defaults)


def claim_out_dir(out_dir: str):
    """Create out_dir if needed (an error line if it cannot be written) and lock it for this
    process, so that a second run on it stops at once instead of interleaving its steps. The
    lock goes with the process, however it ends; released, its .lock file is removed, and a
    directory this process created and left empty too."""
    real = os.path.realpath(out_dir)
    if real in _claimed or rank():  # rank 0 holds it for all ranks
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        sys.exit(f"error: --out-dir {out_dir} is a file, not a directory")
    created, path = not os.path.isdir(out_dir), os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 16).decode(errors="replace").strip() or "?"
                os.close(fd)
                sys.exit(f"error: another run (pid {pid}) is using --out-dir {out_dir}; "
                         "wait for it to end")  # fmt: skip
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder removed it as this process opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:  # read-only, not a directory, a full disk
        sys.exit(f"error: cannot write to --out-dir {out_dir}: {e.strerror}")
    _claimed[real] = (fd, created)
    atexit.register(release_out_dir, out_dir)


def release_out_dir(out_dir: str):
    """Unlock out_dir and remove its .lock; remove out_dir too if this process created it and
    wrote nothing there."""
    fd, created = _claimed.pop(os.path.realpath(out_dir), (None, False))
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.remove(os.path.join(out_dir, ".lock"))  # still held: no other process has it
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
    os.close(fd)


def check_same_run(out_dir: str, settings: dict, defaults: dict):
    """An out_dir holds one run: resuming needs the same settings, bar the RESUMABLE ones. A
    setting missing from an older run's args.json counts as its default."""
    path = os.path.join(out_dir, "args.json")
    if not os.path.isfile(path):
        if os.path.isdir(out_dir) and any(
            n == "metrics.jsonl" or n.startswith("step_") for n in os.listdir(out_dir)
        ):
            sys.exit(
                f"error: {out_dir} holds training output but no args.json; choose another --out-dir"
            )
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        sys.exit(f"error: {path} is damaged; choose another --out-dir")
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    changed = [
        k for k in settings if k not in RESUMABLE and saved.get(k, defaults[k]) != settings[k]
    ]
    if changed:
        diffs = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k, defaults[k])!r} -> {settings[k]!r}"
            for k in changed[:4]
        )
        sys.exit(
            f"error: {out_dir} holds a different run ({diffs}); "
            "choose another --out-dir or use its settings"
        )


def write_atomic(path: str, text: str):
    """Whole or not at all: a temporary file, flushed to disk, then renamed (removed if writing
    it failed)."""
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


OWN_TMP = re.compile(r"(args\.json|metrics\.jsonl|samples\.jsonl|step_\d{6}|final)\.tmp")


def start_logs(out_dir: str, settings: dict, step: int, report_to: str = "none"):
    """Write args.json and cut the logs back to `step`: a resumed run logs each step once. What
    a killed run left half-written is removed: its own NAME.tmp files only, never another one.
    With report_to, the steps also go to a live dashboard (support/dashboards.py)."""
    global _dashboard
    if rank():
        return
    try:
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if OWN_TMP.fullmatch(name):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        write_atomic(os.path.join(out_dir, "args.json"), json.dumps(settings, indent=1))
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = os.path.join(out_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    kept = [line for line in f if logged_step(line) <= step]
                write_atomic(path, "".join(kept))
    except OSError as e:
        sys.exit(f"error: cannot write to {out_dir}: {e.strerror}; nothing was trained")
    if report_to != "none":
        _dashboard = Dashboard(report_to, out_dir, settings, step)
        atexit.register(_dashboard.close)


def logged_step(line: str) -> float:
    """The step a metrics.jsonl or samples.jsonl line logs; inf for a line cut short by a crash
    or anything else that is not one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return math.inf
    return step if type(step) is int else math.inf


def log_step(out_dir: str, metrics: dict, shown: dict, write=print):
    """Append a step's metrics to metrics.jsonl and print a line of those named in `shown`
    ({name: format}), in its order (rank 0 alone)."""
    if rank():
        return
    append(out_dir, "metrics.jsonl", [json.dumps(metrics) + "\n"])
    if _dashboard:
        _dashboard.log(metrics)
    parts = [f.format(metrics[k]) for k, f in shown.items() if metrics.get(k) is not None]
    write(" | ".join([f"step {metrics['step']:>4}", *parts]))


def sample_due(step: int, every: int, last: int) -> bool:
    """Samples are kept on the first and last step and every `every` steps (0: never)."""
    return bool(every) and (step % every == 0 or step in (1, last))


def log_samples(out_dir, step, prompts, completions, golds, rewards, group_size, write=print):
    """The first completion of each of the first 3 groups to samples.jsonl; 2 of them printed."""
    if rank():
        return
    G = group_size
    samples = [
        {"step": step, "prompt": prompts[j // G], "completion": completions[j], "gold": golds[j],
         "reward": float(rewards[j])}
        for j in range(0, min(len(completions), 3 * G), G)
    ]  # fmt: skip
    append(out_dir, "samples.jsonl", [json.dumps(s) + "\n" for s in samples])
    if _dashboard:
        _dashboard.samples(step, samples)
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
