"""LoRA through peft (--lora-rank): what trains, what a checkpoint holds, the merged final/,
the KL reference, and the tiny LoRA demo."""

import json
import math
import os
import shutil

import pytest
import torch
from conftest import one_line_exit, tiny_args

import aent
import eval as ev
from support import checkpoints, demo, models
from support.signals import StopRequest


def lora_base():
    """The frozen base of the tiny LoRA demo: the tiny model with its confident head."""
    model, _ = demo.build_tiny(0)
    demo.confident_tiny_head(model)
    return model


def test_lora_learning_rate_is_ten_times_the_full_default_unless_given():
    assert aent.parse_args(["--lora-rank", "8"]).lr == 2e-5
    assert aent.parse_args(["--lora-rank", "8", "--recipe", "r1-distill"]).lr == 1e-5
    assert aent.parse_args(["--lora-rank", "8", "--lr", "3e-6"]).lr == 3e-6
    assert aent.parse_args(["--model", "tiny", "--lora-rank", "8"]).lr == 1e-3  # the demo's
    assert aent.parse_args([]).lr == 2e-6


def test_the_tiny_heads_cap_is_what_keeps_lora_from_the_answer():
    """Why the LoRA demo's base has a confident head: through the frozen final norm and tied head
    of the random tiny model no last hidden state makes a digit more than ~5% likely."""

    def best_probability(model, token):
        norm, head = model.model.norm.weight.detach(), model.lm_head.weight.detach()
        x = torch.randn(
            norm.numel(), requires_grad=True, generator=torch.Generator().manual_seed(0)
        )
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(300):
            logp = (norm * x / x.pow(2).mean().sqrt() @ head.T).log_softmax(-1)[token]
            (-logp).backward()
            opt.step()
            opt.zero_grad()
        return logp.exp().item()

    model, tokenizer = demo.build_tiny(0)
    seven = tokenizer.convert_tokens_to_ids("7")
    assert best_probability(model, seven) < 0.06
    assert best_probability(lora_base(), seven) > 0.9


@pytest.mark.slow
def test_lora_demo_learns_and_its_final_is_a_plain_model_with_the_adapters_merged(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    args = aent.parse_args(["--model", "tiny", "--lora-rank", "8", "--out-dir", str(out)])
    model = aent.train(args)
    rewards = [json.loads(line)["reward"] for line in open(out / "metrics.jsonl")]
    assert len(rewards) == demo.TINY_DEMO["steps"]
    assert sum(rewards[-10:]) / 10 >= sum(rewards[:10]) / 10 + 0.2
    base = lora_base().state_dict()  # after 150 steps and the merge into final/: untouched
    for name, p in model.named_parameters():
        if "lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[plain]), name

    final = out / "final"
    assert not (final / "adapter_config.json").exists()  # from_pretrained sees a plain model
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name in merged.state_dict())
    adapted = PeftModel.from_pretrained(lora_base(), final / "adapter")
    ids = torch.randint(3, 99, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(ids).logits  # the model as training left it
        assert torch.equal(adapted(ids).logits, trained)
        # in float64, so that only the merged weights' rounding to fp32 differs: 1.8e-5 measured
        # on logits of order 1 (in fp32, sums in another order too: 1e-4 on another CPU)
        merged_64, adapted_64 = merged.double()(ids).logits, adapted.double()(ids).logits
        torch.testing.assert_close(merged_64, adapted_64, rtol=1e-4, atol=1e-4)
        scored, _ = ev.load_checkpoint(str(final), torch.device("cpu"))  # eval.py: unmerged
        assert torch.equal(scored(ids).logits, trained)

    # the merge added (alpha / r) B A to each adapted layer; every other tensor is the base's
    base, weights = lora_base().state_dict(), load_file(final / "model.safetensors")
    adapters = load_file(final / "adapter" / "adapter_model.safetensors")
    adapted_layers = 0
    for name, w in weights.items():
        a = adapters.get("base_model.model." + name.replace(".weight", ".lora_A.weight"))
        if a is None:
            assert torch.equal(w, base[name]), name
            continue
        b = adapters["base_model.model." + name.replace(".weight", ".lora_B.weight")]
        torch.testing.assert_close(w, base[name] + 32 / 8 * b @ a)
        assert not torch.equal(w, base[name])
        adapted_layers += 1
    assert adapted_layers == 14  # q, k, v, o, gate, up and down of both layers


def test_lora_trains_the_adapters_alone_and_a_step_checkpoint_holds_only_them(tmp_path):
    stop = StopRequest()
    stop.requested = "test"  # stop after the first step (two updates): the model stays unmerged
    out = tmp_path / "run"
    model = aent.train(tiny_args(out, "--lora-rank", "8", "--steps", "5"), stop)
    base = lora_base().state_dict()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32
        else:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p, base[plain]), name
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    step = out / "step_000001"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(step / "adapter"))
    assert not (step / "model.safetensors").exists()  # the frozen base is not saved again
    saved = torch.load(step / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == 28  # AdamW moments for the 28 adapter matrices, nothing else
    assert checkpoints.checkpoint_problem(str(step)) is None
    from peft import PeftModel

    scored, _ = ev.load_checkpoint(str(step), torch.device("cpu"))  # the run's base + adapters
    trained = PeftModel.from_pretrained(lora_base(), step / "adapter")
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(scored(ids).logits, trained(ids).logits)
    shutil.copytree(step, tmp_path / "moved")  # away from its run's args.json: one error line
    assert "LoRA adapters" in models.saved_model_problem(str(tmp_path / "moved"))
    os.remove(step / "adapter" / "adapter_model.safetensors")
    assert checkpoints.checkpoint_problem(str(step)).startswith("adapter/: it has no weights")


def test_lora_beta_scores_the_base_with_adapters_off_and_loads_no_second_model(
    tmp_path, monkeypatch
):
    loaded, pairs = [], []
    load, loss = models.load_model, aent.aent_loss

    def loss_seen(logp, *a, ref_logp=None, **k):
        pairs.append((logp.detach(), ref_logp))
        return loss(logp, *a, ref_logp=ref_logp, **k)

    monkeypatch.setattr(
        models, "load_model", lambda name, *a, **k: loaded.append(name) or load(name, *a, **k)
    )
    monkeypatch.setattr(aent, "aent_loss", loss_seen)
    out = tmp_path / "run"
    aent.train(tiny_args(out, "--lora-rank", "8", "--beta", "0.1", "--steps", "2"))
    assert loaded == ["tiny"]  # the policy's base, once
    logp, ref = pairs[0]  # before the first update B = 0: the policy is the base
    assert torch.equal(logp, ref)
    assert not torch.equal(*pairs[-1])  # later the adapters move the policy away from it
    kls = [json.loads(line)["kl_ref"] for line in open(out / "metrics.jsonl")]
    assert all(k > 0 and math.isfinite(k) for k in kls)


def test_a_crafted_or_truncated_adapter_is_one_line_for_training_and_for_eval(tmp_path):
    out = tmp_path / "run"
    aent.train(tiny_args(out, "--lora-rank", "8", "--steps", "1", "--save-every", "1"))
    adapter = out / "final" / "adapter"
    safetensors = (adapter / "adapter_model.safetensors").read_bytes()
    os.remove(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")  # code
    flags = ["--model", "tiny", "--out-dir", str(out), "--lora-rank", "8", "--steps", "2"]
    for argv in ([*flags, "--save-every", "1"], None):
        if argv is None:  # eval.py on the same checkpoint
            message = one_line_exit(ev.main, ["--model", str(out / "final"), "--benchmarks",
                                              "x.jsonl", "--out-dir", str(tmp_path / "e")])  # fmt: skip
            assert "x.jsonl" in message  # the benchmark is checked first; now a real one
            bench = tmp_path / "b.jsonl"
            bench.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
            message = one_line_exit(ev.main, ["--model", str(out / "final"), "--benchmarks",
                                              str(bench), "--out-dir", str(tmp_path / "e")])  # fmt: skip
        else:
            message = one_line_exit(aent.main, argv)
        assert "adapter" in message, message
    assert not os.path.exists("pwned")
    (adapter / "adapter_model.bin").unlink()
    (adapter / "adapter_model.safetensors").write_bytes(safetensors[: len(safetensors) // 2])
    bench = tmp_path / "b.jsonl"
    message = one_line_exit(ev.main, ["--model", str(out / "final"), "--benchmarks", str(bench),
                                      "--out-dir", str(tmp_path / "e2")])  # fmt: skip
    assert "adapter_model.safetensors is truncated" in message
