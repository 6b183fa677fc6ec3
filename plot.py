"""Plot training curves of aent.py runs: reward, clamped and full entropy, the probability outside
the kept set, the coefficient lambda and the response length against step, one panel each,
every run in every panel (PNG, PDF or SVG by the name of --out).

    python plot.py runs/grpo runs/aent --out curves.png
    python plot.py runs/tiny-none runs/tiny-full runs/tiny-clamped --smooth 10

Each run is a directory aent.py wrote (its metrics.jsonl); the legend names it by its directory
and its --entropy setting from args.json.
"""

import argparse
import json
import os
import sys

PANELS = [
    ("reward", "reward (mean of the step)"),
    ("entropy_clamped", "clamped entropy H~ (nats)"),
    ("entropy_full", "full entropy H (nats)"),
    ("dropped_mass", "probability outside the kept set"),
    ("entropy_coef", "coefficient lambda"),
    ("response_len", "response length (tokens)"),
]


def read_run(path: str) -> tuple[str, list[dict]]:
    """(label, metrics rows) of a run directory; an error line if it has no metrics.jsonl or
    no step in it. Lines that are not a step's metrics (cut short by a crash, or anything
    else) are passed over."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        sys.exit(f"error: {path} has no metrics.jsonl (is it an aent.py --out-dir?)")
    rows = []
    try:
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(row, dict) and type(row.get("step")) is int:
                    rows.append(row)
    except OSError as e:
        sys.exit(f"error: cannot read {metrics}: {e.strerror}")
    if not rows:
        sys.exit(f"error: {metrics} holds no step's metrics")
    label = os.path.basename(os.path.normpath(path))
    try:
        with open(os.path.join(path, "args.json"), encoding="utf-8") as f:
            label += f" (--entropy {json.load(f)['entropy']})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return label, rows


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (1: the values themselves)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", help="run directories (aent.py --out-dir)")
    ap.add_argument("--out", default="curves.png", help="the PNG to write")
    ap.add_argument("--smooth", type=int, default=1, help="trailing mean over this many steps")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error("--smooth must be at least 1")
    kind = os.path.splitext(args.out)[1].lstrip(".").lower()
    if kind not in ("png", "pdf", "svg"):
        ap.error("--out must end in .png, .pdf or .svg")
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        sys.exit(f"error: cannot write {args.out}: not a file in a writable directory")
    runs = [read_run(path) for path in args.runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        for label, rows in runs:
            points = [(r["step"], r[key]) for r in rows if number(r.get(key))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, smooth(list(values), args.smooth), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(args.out + ".tmp", dpi=110, format=kind)
        os.replace(args.out + ".tmp", args.out)
    except OSError as e:
        if os.path.exists(args.out + ".tmp"):
            os.remove(args.out + ".tmp")
        sys.exit(f"error: cannot write {args.out}: {e.strerror}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
