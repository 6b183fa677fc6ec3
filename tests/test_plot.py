"""plot.py draws every run into one PNG."""

import json

from conftest import one_line_exit, write_jsonl


def test_plot_draws_every_run_into_one_png_and_refuses_a_directory_without_metrics(tmp_path):
    import plot

    runs = []
    for bonus in ("none", "clamped"):
        run = tmp_path / bonus
        run.mkdir()
        (run / "args.json").write_text(json.dumps({"entropy": bonus}))
        rows = [{"step": s, "reward": s / 20, "entropy_clamped": 1.0, "entropy_full": 2.0,
                 "entropy_coef": 0.0 if bonus == "none" else 0.01, "response_len": 3.0}
                for s in range(1, 21)]  # fmt: skip
        write_jsonl(run / "metrics.jsonl", [*rows, '{"step": 21, "rew'])  # a cut-off last line
        runs.append(str(run))
    plot.main([*runs, "--out", str(tmp_path / "c.png"), "--smooth", "5"])
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert plot.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert "has no metrics.jsonl" in one_line_exit(plot.main, [str(tmp_path)])
