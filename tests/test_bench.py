"""bench.py runs end to end on a miniature preset (the real figures come from `python bench.py`)."""

import json

import pytest


MINI = dict(
    hidden=16,
    layers=1,
    heads=2,
    kv_heads=1,
    intermediate=32,
    vocab=600,
    prompts=2,
    group=2,
    new_tokens=3,
    steps=1,
    chunk=16,
    micro=4,
    pass_tokens=[40],
)


def run_bench(tmp_path, monkeypatch, *flags):
    import bench

    monkeypatch.setitem(bench.PRESETS, "mini", MINI)
    monkeypatch.chdir(tmp_path)
    bench.main(["--preset", "mini", "--out", "b.json", *flags])
    return json.loads((tmp_path / "b.json").read_text())


@pytest.mark.slow
def test_bench_measures_our_step_and_both_passes(tmp_path, monkeypatch, capsys):
    out = run_bench(tmp_path, monkeypatch)
    assert (
        0 < out["ours"]["tokens"] <= 2 * 2 * 3
        and 0 < out["ours"]["rollout_time"] < out["ours"]["step_time"]
    )
    assert (
        out["ours"]["peak_mib"] > 100
        and out["pass_chunked_40"]["time"] > 0
        and out["pass_full_40"]["extra_mib"] >= 0
    )
    assert "rollout tokens/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_runs_trl_side_by_side_when_it_is_installed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    out = run_bench(tmp_path, monkeypatch, "--vs-trl", "--no-pass")
    assert (
        0 < out["trl"]["tokens"] <= 2 * 2 * 3
        and out["ratios"]["step_time"] == out["ours"]["step_time"] / out["trl"]["step_time"]
    )
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_spread_runs_the_update_trimmed_and_untrimmed_on_spread_lengths(
    tmp_path, monkeypatch, capsys
):
    import bench

    small = dict(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab=99, prompts=2,
                 group=4, new_tokens=160, prompt_tokens=(5, 20), median=120, sigma=0.5,
                 at_limit=0.25, micro=2, chunk=64)  # fmt: skip
    monkeypatch.setattr(bench, "SPREAD", small)
    monkeypatch.chdir(tmp_path)
    bench.main(["--spread", "--out", "b.json"])
    out = json.loads((tmp_path / "b.json").read_text())["spread"]
    lengths = out["lengths"]
    assert len(lengths) == 8 and min(lengths) >= 100 and max(lengths) == 160
    trimmed, untrimmed = out["trimmed"], out["untrimmed"]
    assert trimmed["real_tokens"] == untrimmed["real_tokens"]
    assert untrimmed["positions"] == 8 * (20 + 160)  # every micro-batch at the full width
    assert trimmed["positions"] < untrimmed["positions"]
    assert 0 <= trimmed["padding"] < untrimmed["padding"] < 1
    assert "padding fraction" in capsys.readouterr().out
