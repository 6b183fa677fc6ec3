"""mdp.py, the paper's synthetic experiment: the README's finding at full size."""

import json

import pytest

import torch


@pytest.mark.slow
def test_synthetic_mdp_full_bonus_fails_with_one_optimal_action_where_clamped_keeps_working(
    tmp_path,
):
    """mdp.py at full size (|A| = 1e5, 500 steps) on fewer seeds and m values: the README's finding."""
    import mdp

    results = mdp.main(["--ms", "1", "10", "--seeds", "2", "--out", str(tmp_path)])
    value = {k: {m: results[k][m]["mean"] for m in ("1", "10")} for k in mdp.METHODS}
    assert value["clamped"]["1"] > 0.9 and value["clamped"]["10"] > 0.9
    assert value["full"]["1"] < value["clamped"]["1"] - 0.5  # the full bonus's bias at m = 1
    assert value["full"]["10"] > 0.8  # ... which is small enough at m = 10
    for m in ("1", "10"):
        assert value["aent"][m] >= value["none"][m]
    curve = torch.tensor(
        json.load(open(tmp_path / "results.json"))["values_at_sparsest_m"]["full"]
    ).mean(1)
    assert (
        curve.max() - curve[-1] > 0.3
    )  # at m = 1 the full bonus first helps, then its bias drags V down
    assert (tmp_path / "mdp.png").stat().st_size > 10_000
