"""Model directories: checked before loading, saved so that transformers 4.x reads them, and
the real Qwen2.5-Math-1.5B tokenizer and config from ../shared/data when present."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import HERE, QWEN, one_line_exit, truncate, write_jsonl

import aent
from support import data, models
from support.demo import build_tiny


def test_a_damaged_model_directory_is_one_line_error(tmp_path, tiny_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    truncate(model / "model.safetensors", 0.7)
    flags = ["--model", str(model), "--dataset", "toy", "--out-dir", str(tmp_path / "o")]
    message = one_line_exit(aent.main, flags)
    assert (
        message
        == f"error: cannot load model directory {model}: its model.safetensors is truncated or damaged"
    )
    assert not (tmp_path / "o").exists()


def test_tiny_tokenizer_reloads_from_a_saved_checkpoint_unchanged(tiny_dir):
    from transformers import AutoTokenizer

    text = "Question: Tom has 3 apples.\nAnswer: <|im_end|>"
    assert (
        AutoTokenizer.from_pretrained(tiny_dir)(text).input_ids == build_tiny()[1](text).input_ids
    )


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random model from Qwen2.5-Math-1.5B's config with 2 layers and hidden size 64 (the real
    151,936-row vocabulary), beside the real tokenizer files as the hub serves them."""
    if not os.path.isdir(QWEN):
        pytest.skip(f"{QWEN} not present")
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    config = json.load(open(os.path.join(QWEN, "config.json")))
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_window_layers=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config.from_dict({**config, **small}))
    model.generation_config = GenerationConfig.from_pretrained(QWEN)
    path = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(path)
    for name in os.listdir(QWEN):
        if name in models.TOKENIZER_FILES:
            shutil.copyfile(os.path.join(QWEN, name), path / name)
    return path


def test_qwen_prompt_is_the_qwen25_math_harness_prompt(qwen_dir):
    from transformers import AutoTokenizer

    prompt = aent.build_prompt(AutoTokenizer.from_pretrained(qwen_dir), "  What is 1+1? \n")
    assert prompt == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\n  What is 1+1? \n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # the template keeps the question as given: problem_from_row strips it
    assert (
        data.problem_from_row({"question": "  What is 1+1? \n", "answer": "2"})["question"]
        == "What is 1+1?"
    )


def test_qwen_stops_on_endoftext_and_im_end_and_cuts_at_the_first(qwen_dir):
    model, tokenizer = models.load_model(str(qwen_dir), torch.device("cpu"))
    eos = models.stop_token_ids(model, tokenizer)
    assert eos == [151643, 151645]
    ids = tokenizer("12 apples", add_special_tokens=False).input_ids
    rows = torch.tensor([ids + [151645, 17, 151643], ids + [151643, 151645, 17]])
    mask = aent.completion_mask(rows, eos)
    assert mask.sum(1).tolist() == [len(ids) + 1] * 2  # up to and including the first stop id
    texts = tokenizer.batch_decode(rows.masked_fill(mask == 0, 151643), skip_special_tokens=True)
    assert texts == ["12 apples", "12 apples"]


@pytest.mark.slow
def test_one_step_and_an_eval_on_the_real_qwen_vocabulary_and_a_faithful_checkpoint(
    tmp_path, qwen_dir
):
    from transformers import AutoConfig, AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"What is {a} + {a}?",
                                              "answer": f"#### {2 * a}"} for a in range(4)])  # fmt: skip
    out = tmp_path / "run"
    aent.main(["--model", str(qwen_dir), "--dataset", data, "--steps", "1", "--prompts-per-step",
               "2", "--group-size", "2", "--mini-batch-prompts", "2", "--max-new-tokens", "4",
               "--max-prompt-tokens", "128", "--logits-chunk", "64", "--out-dir", str(out)])  # fmt: skip
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
    final = out / "final"
    for name in os.listdir(QWEN):  # the source's tokenizer files, byte for byte
        if name in models.TOKENIZER_FILES:
            assert (final / name).read_bytes() == open(os.path.join(QWEN, name), "rb").read()
    source, saved = AutoTokenizer.from_pretrained(QWEN), AutoTokenizer.from_pretrained(final)
    texts = [aent.build_prompt(source, "Find $x^2$ if x = 3.14."), "1,600 dollars <|im_end|>",
             "日本語 and émoji 🎉", "<|endoftext|>\\boxed{\\frac{1}{2}}"]  # fmt: skip
    assert [saved(t).input_ids for t in texts] == [source(t).input_ids for t in texts]
    config = json.load(open(final / "config.json"))  # rope_theta also where 4.x reads it
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000
    assert AutoConfig.from_pretrained(final).rope_parameters["rope_theta"] == 10000
    cmd = [sys.executable, "eval.py", "--model", str(final), "--benchmarks", data,
           "--max-new-tokens", "4", "--out-dir", str(tmp_path / "eval")]  # fmt: skip
    res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.load(open(tmp_path / "eval" / "summary.json"))["benchmarks"][data]["n"] == 4


def test_stop_token_ids_include_qwen_end_tokens(tiny):
    model, tokenizer = tiny
    ids = models.stop_token_ids(model, tokenizer)
    assert set(ids) == {
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
