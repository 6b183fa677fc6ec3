"""SIGINT, SIGTERM and SIGHUP during training: finish the step, write a checkpoint, exit 0."""

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
