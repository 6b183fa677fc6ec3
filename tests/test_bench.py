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
