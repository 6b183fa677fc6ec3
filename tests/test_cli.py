"""The command line: --help, the CPU demo's and the recipes' presets, and impossible settings
refused in one line before anything is written."""

import dataclasses
import subprocess
import sys

import pytest
from conftest import HERE, one_line_exit, run_aent

import aent
from support.demo import TINY_DEMO


def test_help_explains_every_field():
    out = subprocess.run(
        [sys.executable, "aent.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout
    for f in dataclasses.fields(aent.Args):
        assert "--" + f.name.replace("_", "-") in out
        assert f.metadata["help"].split()[0] in out


def test_tiny_model_takes_demo_defaults_only_for_flags_not_given():
    args = aent.parse_args(["--model", "tiny", "--lr", "0.5"])
    assert args.lr == 0.5 and args.dataset == "toy" and args.steps == TINY_DEMO["steps"]
    assert aent.parse_args(["--model", "x"]).lr == 2e-6
    assert aent.parse_args(["--no-adaptive-coef"]).adaptive_coef is False


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--group-size", "1"], "group-size"),
        (["--drop-frac", "1.0"], "drop-frac"),
        (["--keep-top-k", "0"], "keep-top-k"),
        (["--micro-batch-size", "0"], "micro-batch-size"),
        (["--mini-batch-prompts", "0"], "mini-batch-prompts"),
        (["--dataset", "nope.txt"], "unknown dataset"),
        (["--top-p", "0"], "top-p"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "-1"], "--lr must be in (0, 1]"),
        (["--lr", "1e39"], "--lr must be in (0, 1]"),
        (["--temperature", "nan"], "--temperature"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
        (["--clip-low", "5"], "--clip-low"),
        (["--clip-high", "-2"], "--clip-high"),
        (["--dual-clip", "0.5"], "--dual-clip"),
        (["--beta", "-0.1"], "--beta"),
        (["--save-every", "-1"], "--save-every"),
        (["--seed", str(2**70)], "--seed"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
        (["--long-prompts", "maybe"], "--long-prompts"),
        (["--lora-rank", "-1"], "--lora-rank must be at least 0"),
        (["--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    ],
)
def test_bad_configuration_is_one_line_error(tmp_path, flags, words):
    assert words in one_line_exit(
        aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "run"), *flags]
    )
    assert not (tmp_path / "run").exists()


def test_the_command_line_prints_a_bad_configuration_as_one_line_without_a_traceback(tmp_path):
    res = run_aent("--model", "tiny", "--group-size", "1", "--out-dir", str(tmp_path / "run"))
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "error: --group-size must be at least 2 (group advantages need a group)"
    ]


def test_recipes_are_the_authors_published_settings_for_every_flag_not_given():
    r1 = aent.parse_args(["--recipe", "r1-distill"])
    want = dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", dataset="openr1", prompt="verl", steps=936,
                drop_frac=0.25, entropy_coef=3e-4, h_low=0.35, h_high=0.62, coef_lr=1e-4,
                coef_warmup=156, coef_min=4e-5, coef_max=1e-3, prompts_per_step=256, group_size=8,
                mini_batch_prompts=64, ppo_epochs=1, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                max_prompt_tokens=1024, max_new_tokens=7168, temperature=1.0, top_p=1.0)  # fmt: skip
    assert {k: getattr(r1, k) for k in want} == want
    qwen = aent.parse_args(["--recipe", "qwen-math", "--lr", "3e-6"])
    want = dict(model="Qwen/Qwen2.5-Math-1.5B", dataset="math", prompt="verl", steps=420, drop_frac=0.33,
                entropy_coef=0.002, h_low=0.15, h_high=0.24, coef_lr=0.002, coef_warmup=30,
                coef_min=6e-4, coef_max=9e-3, prompts_per_step=512, group_size=16,
                mini_batch_prompts=128, max_new_tokens=3072, lr=3e-6)  # fmt: skip
    assert {k: getattr(qwen, k) for k in want} == want  # a flag given wins over the recipe


def test_a_recipe_with_the_tiny_model_is_refused_and_flags_without_effect_are_named(capsys):
    message = one_line_exit(aent.parse_args, ["--model", "tiny", "--recipe", "qwen-math"])
    assert "--recipe" in message
    aent.parse_args(["--entropy", "full", "--drop-frac", "0.2", "--lora-alpha", "8"])
    notes = capsys.readouterr().out.strip().splitlines()
    assert notes == [
        "note: --drop-frac has no effect with --entropy full, which keeps every token",
        "note: --lora-alpha has no effect without --lora-rank",
    ]
    aent.parse_args(["--entropy", "none", "--keep-top-k", "10", "--h-low", "0.1"])
    assert capsys.readouterr().out.strip() == "note: --h-low has no effect with --entropy none"
    aent.parse_args(["--no-adaptive-coef", "--coef-max", "0.1", "--entropy-coef", "0.2"])
    assert capsys.readouterr().out.strip() == (
        "note: --coef-max has no effect with --no-adaptive-coef"
    )  # and the diagnostics of --entropy none keep their kept set: no note


@pytest.mark.parametrize("decay", ["1e30", "2", "-0.1"])
def test_a_weight_decay_that_would_blow_the_weights_up_is_refused(tmp_path, decay):
    message = one_line_exit(aent.main, ["--model", "tiny", "--weight-decay", decay,
                                        "--out-dir", str(tmp_path / "run")])  # fmt: skip
    assert "--weight-decay must be in [0, 1]" in message
