"""Watching a run live (--report-to): every scalar of metrics.jsonl under the same name at its
step, args.json as the run's config, the stored samples as text; TensorBoard event files under
OUT/tensorboard/, or a Weights & Biases run (WANDB_MODE=offline works offline) whose id is kept
in OUT/wandb_id.txt. A resumed run continues the same one without doubling a step: TensorBoard
hides what a killed run logged after its checkpoint; W&B is sent no step it already holds."""

import os
import sys

REPORTS = ("none", "tensorboard", "wandb")  # --report-to
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # what to pip install for each


def check_installed(kind: str):
    """One error line, before anything loads, if the package a report needs is missing."""
    if kind != "none":
        try:
            __import__(PACKAGES[kind])
        except ImportError:
            sys.exit(f"error: --report-to {kind} needs {kind}: pip install {PACKAGES[kind]}")


class Dashboard:
    """The live report of a run, opened at `step` (0 for a new run, else its checkpoint's)."""

    def __init__(self, kind: str, out_dir: str, settings: dict, step: int):
        self.kind, self.tb, self.wandb = kind, None, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run wrote after its checkpoint are hidden, not doubled
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1)
            if step == 0:
                rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
                self.tb.add_text("args", "| setting | value |\n|---|---|\n" + rows, 0)
        elif kind == "wandb":
            import wandb

            id_file = os.path.join(out_dir, "wandb_id.txt")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else None
            name = os.path.basename(os.path.abspath(out_dir))
            self.wandb = wandb.init(project="aent", name=name, dir=out_dir, config=settings,
                                    id=run_id, resume="allow")  # fmt: skip
            with open(id_file, "w") as f:  # the run a resumed one continues
                f.write(self.wandb.id)

    def log(self, metrics: dict):
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.wandb and step >= self.wandb.starting_step:  # one it does not hold yet
            self.wandb.log(scalars, step=step)

    def samples(self, step: int, samples: list[dict]):
        if self.tb:
            rows = [f"**reward {s['reward']:.0f}**, gold {s['gold']}\n\n```\n{s['completion']}\n```"
                    for s in samples]  # fmt: skip
            self.tb.add_text("samples", "\n\n".join(rows), step)
            self.tb.flush()
        if self.wandb and step >= self.wandb.starting_step:
            import wandb

            columns = ["prompt", "completion", "gold", "reward"]
            table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self.wandb.log({"samples": table}, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
