"""plot.py draws every run into one PNG."""

import json
import os

import pytest
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


def test_plot_writes_the_format_its_name_asks_for_and_refuses_bad_input_in_one_line(tmp_path):
    import plot

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward": 0.1 * s} for s in range(1, 4)]
    lines = [*rows, [1, 2], {"reward": 1}, {"step": "4", "reward": 1}, {"step": 5, "reward": "x"}]
    write_jsonl(run / "metrics.jsonl", lines)  # only the first three are a step's metrics
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "reward": "\xff\xfe"}\n')  # not UTF-8
    for name, magic in (("c.pdf", b"%PDF"), ("c.svg", b"<?xml"), ("c.png", b"\x89PNG")):
        plot.main([str(run), "--out", str(tmp_path / name)])
        assert (tmp_path / name).read_bytes().startswith(magic)
    (tmp_path / "ro").mkdir(mode=0o500)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    for argv, words in [
        ([str(run), "--out", str(tmp_path / "missing" / "c.png")], "cannot write"),
        ([str(run), "--out", str(tmp_path)], "--out must end in"),
        ([str(run), "--out", str(tmp_path / "dir.png")], "cannot write"),
        ([str(empty), "--out", str(tmp_path / "e.png")], "holds no step's metrics"),
    ]:
        if argv[-1].endswith("dir.png"):
            (tmp_path / "dir.png").mkdir()
        with pytest.raises(SystemExit) as stop:
            plot.main(argv)
        assert words in str(stop.value.code) or stop.value.code == 2, (argv, stop.value.code)
    if os.geteuid() != 0:  # root writes anywhere
        assert "cannot write" in one_line_exit(
            plot.main, [str(run), "--out", str(tmp_path / "ro" / "c.png")]
        )
