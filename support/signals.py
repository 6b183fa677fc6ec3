"""SIGINT, SIGTERM and SIGHUP during training: finish the step, write a checkpoint, exit 0. And a
reader of stdout that goes away (`python aent.py ... | head -1`): the run goes on, unprinted."""

import os
import signal
import sys
from typing import Optional

from support.checkpoints import last_checkpoint_note
from support.distributed import rank
from support.rundir import release_out_dir


class StopRequest:
    """Inside `with StopRequest(out_dir) as stop:`, SIGINT, SIGTERM and SIGHUP set
    stop.requested: the training loop finishes its step, writes a checkpoint and returns. A
    second Ctrl-C stops at once, leaving the checkpoints as they were. Leaving the block
    releases the lock on out_dir that the run took."""

    requested = None

    def __init__(self, out_dir: Optional[str] = None, note=None):
        self.out_dir, self.note = out_dir, note  # note(): what a second Ctrl-C leaves

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # an ignored one (nohup) stays so
        self.previous = {s: signal.getsignal(s) for s in signals}
        self.stdout, sys.stdout = sys.stdout, Unbreakable(sys.stdout)
        for s in signals:
            if self.previous[s] is not signal.SIG_IGN:
                signal.signal(s, self.handle)
        return self

    def __exit__(self, kind, value, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.stdout = self.stdout
        if self.out_dir:
            release_out_dir(self.out_dir)
        if kind is SystemExit and isinstance(value.code, str) and rank():
            raise SystemExit(1)  # rank 0 says it
        if kind is KeyboardInterrupt:
            note = self.note() if self.note else None
            note = note or (
                last_checkpoint_note(self.out_dir) if self.out_dir else "nothing was saved"
            )
            sys.exit(f"interrupted ({note})")

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail
            silence(1)
            silence(2)


def silence(fd: int):
    """Point file descriptor fd at /dev/null: what is written there from now on is dropped."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class Unbreakable:
    """A text stream that survives its reader going away: on a broken pipe its descriptor
    points at /dev/null and writing goes on, so `aent.py ... | head -1` trains to the end."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            silence(self.stream.fileno())
            return self.stream.write(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            silence(self.stream.fileno())
            self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)
