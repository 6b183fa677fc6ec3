"""The specification of aent.py, as tests. CPU only, offline: every model and data file is built here."""

import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import aent
import plumbing

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# float64 references, written independently of aent.py (sorting, explicit loops)
# ----------------------------------------------------------------------------------------------
def ref_clamped_entropy(logits, k):
    """Entropy of the softmax over the k largest logits of each row, float64, via a full sort."""
    x = logits.double().reshape(-1, logits.size(-1))
    out = []
    for row in x:
        kept = row.sort(descending=True).values[:k]
        p = torch.exp(kept - torch.logsumexp(kept, 0))
        out.append(-(p * p.log()).sum())
    return torch.stack(out).reshape(logits.shape[:-1])


def ref_policy_loss(logp, old_logp, adv, mask, cl, ch, c):
    total, count = 0.0, 0.0
    for b in range(logp.size(0)):
        for t in range(logp.size(1)):
            if mask[b, t]:
                r = math.exp(logp[b, t].item() - old_logp[b, t].item())
                a = adv[b].item()
                loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
                if a < 0:
                    loss = min(loss, -c * a)
                total += loss
                count += 1
    return total / count


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = plumbing.build_tiny(seed=0)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# clamped entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_frac", [0.0, 0.1, 0.33, 0.5, 0.9])
def test_clamped_entropy_matches_float64_reference_when_dropping_a_fraction(drop_frac):
    logits = torch.randn(3, 5, 257) * 3
    V = logits.size(-1)
    expected = ref_clamped_entropy(logits, V - int(drop_frac * V))
    torch.testing.assert_close(
        aent.clamped_entropy(logits, drop_frac).double(), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("top_k", [1, 2, 17, 256])
def test_clamped_entropy_matches_float64_reference_when_keeping_top_k(top_k):
    logits = torch.randn(4, 256) * 2
    expected = ref_clamped_entropy(logits, top_k)
    torch.testing.assert_close(
        aent.clamped_entropy(logits, top_k=top_k).double(), expected, rtol=1e-5, atol=1e-5
    )


def test_clamped_entropy_equals_full_entropy_when_nothing_is_dropped():
    logits = torch.randn(6, 100)
    full = torch.distributions.Categorical(logits=logits.double()).entropy()
    torch.testing.assert_close(aent.clamped_entropy(logits).double(), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        aent.clamped_entropy(logits, top_k=100).double(), full, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        aent.clamped_entropy(logits, top_k=10_000).double(), full, rtol=1e-5, atol=1e-6
    )


def test_clamped_entropy_of_uniform_logits_is_log_of_kept_count():
    logits = torch.zeros(2, 1000)
    torch.testing.assert_close(aent.clamped_entropy(logits, 0.33), torch.full((2,), math.log(670)))


def test_clamped_entropy_with_drop_frac_near_one_keeps_one_token_and_is_zero():
    logits = torch.randn(3, 50)
    assert (
        aent.clamped_entropy(logits, drop_frac=0.999).abs().max() < 1e-6
    )  # keeps 50 - 49 = 1 token


def test_clamped_entropy_rejects_a_setting_that_keeps_no_token():
    with pytest.raises(ValueError):
        aent.clamped_entropy(torch.randn(2, 10), drop_frac=1.0)
    with pytest.raises(ValueError):
        aent.clamped_entropy(torch.randn(2, 10), top_k=0)


def test_clamped_entropy_gradient_reaches_only_kept_logits_and_matches_float64():
    logits = (torch.randn(4, 40) * 2).requires_grad_()
    aent.clamped_entropy(logits, drop_frac=0.5).sum().backward()
    kept = logits.detach().topk(20, dim=-1).indices
    dropped_mask = torch.ones_like(logits, dtype=torch.bool).scatter(-1, kept, False)
    assert (logits.grad[dropped_mask] == 0).all()
    assert (logits.grad.gather(-1, kept) != 0).all()

    # dH/dz_i = -p_i (log p_i + H) over the kept set, p renormalised there; 0 elsewhere
    z = logits.detach().double().masked_fill(dropped_mask, float("-inf"))
    p = z.softmax(-1)
    logp = torch.where(dropped_mask, 0.0, z.log_softmax(-1))
    H = -(p * logp).sum(-1, keepdim=True)
    torch.testing.assert_close(logits.grad.double(), -p * (logp + H), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------
def test_group_advantages_match_float64_reference():
    G = 8
    rewards = torch.rand(5 * G)
    adv = aent.group_advantages(rewards, G)
    for g in range(5):
        r = rewards[g * G : (g + 1) * G].double()
        mean = r.sum() / G
        std = math.sqrt(((r - mean) ** 2).sum() / (G - 1))
        torch.testing.assert_close(
            adv[g * G : (g + 1) * G].double(), (r - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5
        )


def test_group_advantages_of_a_zero_variance_group_are_zero():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0])
    adv = aent.group_advantages(rewards, 4)
    assert (adv[:8] == 0).all()
    torch.testing.assert_close(adv[8:], torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=1e-4, atol=1e-4)


def test_group_advantages_without_scaling_only_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 0, 0])
    torch.testing.assert_close(
        aent.group_advantages(rewards, 4, scale=False),
        torch.tensor([0.75, -0.25, -0.25, -0.25, 1, 1, -1, -1]),
    )


# ----------------------------------------------------------------------------------------------
# entropy coefficient
# ----------------------------------------------------------------------------------------------
def test_entropy_coef_rises_below_the_band_falls_above_it_and_holds_inside():
    kw = dict(h_low=0.15, h_high=0.24, lr=0.002, coef_min=0.0006, coef_max=0.009)
    assert aent.update_entropy_coef(0.002, 0.10, **kw) == pytest.approx(0.002 + 0.002 * 0.05)
    assert aent.update_entropy_coef(0.002, 0.34, **kw) == pytest.approx(0.002 - 0.002 * 0.10)
    assert aent.update_entropy_coef(0.002, 0.20, **kw) == 0.002


def test_entropy_coef_is_clipped_to_its_bounds():
    kw = dict(h_low=0.15, h_high=0.24, lr=1.0, coef_min=0.0006, coef_max=0.009)
    assert aent.update_entropy_coef(0.002, 0.0, **kw) == 0.009
    assert aent.update_entropy_coef(0.002, 5.0, **kw) == 0.0006


def test_entropy_coef_update_matches_the_rule_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        coef, h, lo, width, lr = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        hi = lo + width
        step = (h - lo if h < lo else 0.0) + (h - hi if h > hi else 0.0)
        expected = min(max(coef - lr * step, 0.1), 0.9)
        assert aent.update_entropy_coef(coef, h, lo, hi, lr, 0.1, 0.9) == pytest.approx(
            expected, abs=1e-12
        )


# ----------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_policy_loss_matches_float64_reference(clip):
    torch.manual_seed(7)
    B, T = 8, 12
    old = torch.randn(B, T) - 2
    logp = old + torch.randn(B, T) * 1.5  # ratios well outside the clip range and beyond c too
    adv = torch.randn(B) * 2
    mask = (torch.rand(B, T) > 0.3).long()
    loss, stats = aent.policy_loss(logp, old, adv, mask, *clip)
    assert loss.item() == pytest.approx(
        ref_policy_loss(logp, old, adv, mask, *clip), rel=1e-5, abs=1e-6
    )
    assert 0 < stats["clip_frac"] < 1 and 0 < stats["dual_clip_frac"] < 1


def test_policy_loss_is_a_token_mean_not_a_mean_of_sequence_means():
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    loss, _ = aent.policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(
        logp.grad[mask.bool()], torch.full((5,), -1 / 5)
    )  # every token weighs 1/5


def test_policy_loss_dual_clip_caps_the_loss_for_negative_advantages():
    logp = torch.tensor([[math.log(10.0)]])  # ratio 10
    loss, stats = aent.policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0
    )
    assert loss.item() == pytest.approx(3.0) and stats["dual_clip_frac"] == 1.0


def test_policy_loss_with_no_tokens_is_zero_not_nan():
    loss, _ = aent.policy_loss(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3)
    )
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------------------------
# completion mask
# ----------------------------------------------------------------------------------------------
def test_completion_mask_keeps_the_first_eos_when_pad_equals_eos():
    EOS = 0  # the tiny tokenizer's pad id is its EOS id
    ids = torch.tensor(
        [[5, 9, EOS, EOS, EOS], [EOS, EOS, EOS, EOS, EOS], [3, 4, 5, 6, 7], [3, 4, 5, 6, EOS]]
    )
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(aent.completion_mask(ids, [EOS]), expected)


def test_completion_mask_stops_at_whichever_eos_id_comes_first():
    ids = torch.tensor([[5, 7, 6, 8, 2], [5, 6, 7, 7, 2]])
    assert torch.equal(
        aent.completion_mask(ids, [6, 7]), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    )


# ----------------------------------------------------------------------------------------------
# answers and grading
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
        ("she pays 1,600 dollars", "1,600"),
        ("first 3, then -4.5", "-4.5"),
        ("3/4 of it", "3/4"),
        ("no number here", None),
        ("cut off in \\boxed{12", None),
        ("\\boxed{3} and then 4", "3"),
    ],
)
def test_extract_answer_takes_the_last_boxed_else_the_last_number(text, answer):
    assert aent.extract_answer(text) == answer


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
        ("\\boxed{x = 3}", "3"),
        ("so 1,600 in total", "1600"),
        ("\\boxed{10\\text{ cm}}", "10"),
        ("\\boxed{(1, 2]}", "(1,2]"),
        ("\\boxed{30^\\circ}", "30"),
        ("The answer is 7", "7"),
    ],
)
def test_grade_accepts_equivalent_answers(completion, gold):
    assert aent.grade(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{4}", "5"),
        ("\\boxed{0.33}", "\\frac13"),
        ("\\boxed{(2,1)}", "(1,2)"),
        ("\\boxed{7}", "-7"),
        ("no answer", "3"),
        ("\\boxed{\\frac{", "3"),
    ],
)
def test_grade_rejects_different_or_malformed_answers(completion, gold):
    assert aent.grade(completion, gold) == 0.0


# ----------------------------------------------------------------------------------------------
# data and prompt
# ----------------------------------------------------------------------------------------------
def test_problem_from_row_reads_gsm8k_math_and_plain_answer_rows():
    assert plumbing.problem_from_row({"question": "q", "answer": "work\n#### 1,600"}) == {
        "question": "q",
        "gold": "1600",
    }
    assert plumbing.problem_from_row({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."}) == {
        "question": "p",
        "gold": "\\frac{1}{2}",
    }
    assert plumbing.problem_from_row({"problem": "p", "answer": 27.0}) == {
        "question": "p",
        "gold": "27.0",
    }
    assert plumbing.problem_from_row({"problem": "p", "solution": "no box"}) is None
    assert plumbing.problem_from_row({"answer": "3"}) is None
    assert plumbing.problem_from_row({"question": "  q \n", "answer": "3"})["question"] == "q"


def test_a_run_shorter_than_sample_every_stores_samples_of_its_first_and_last_step(tmp_path):
    args = aent.parse_args(["--model", "tiny", "--steps", "3", "--out-dir", str(tmp_path / "run")])
    assert args.sample_every > 3
    aent.train(args)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert sorted({s["step"] for s in samples}) == [1, 3] and len(samples) == 6
    assert all(set(s) == {"step", "prompt", "completion", "gold", "reward"} for s in samples)


def test_prompt_uses_the_chat_template_with_the_system_prompt_when_there_is_one(tiny):
    _, tokenizer = tiny
    assert aent.build_prompt(tokenizer, "What is 1 + 1?") == "Question: What is 1 + 1?\nAnswer:"
    tokenizer = plumbing.build_tiny()[1]
    tokenizer.chat_template = (  # Qwen2.5's ChatML, shortened
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    prompt = aent.build_prompt(tokenizer, "What is 1 + 1?")
    assert prompt.startswith("<|im_start|>system\n" + aent.SYSTEM_PROMPT) and prompt.endswith(
        "<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------------------------
# log-probs, entropies and rollout on the tiny model
# ----------------------------------------------------------------------------------------------
def test_token_stats_reproduce_generates_own_scores_under_left_padding(tiny):
    from transformers import GenerationConfig

    model, tokenizer = tiny
    enc = tokenizer(
        ["Question: What is 3 + 4?\nAnswer:", "Hi\nAnswer:"], return_tensors="pt", padding=True
    )
    gen = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        eos_token_id=[0],
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(0)
    out = model.generate(**enc, generation_config=gen)
    completion = out.sequences[:, enc.input_ids.size(1) :]  # [2, 6]
    mask = aent.completion_mask(completion, [0])
    expected = (
        (torch.stack(out.logits, 1).float() / 0.7)
        .log_softmax(-1)
        .gather(-1, completion[..., None])
        .squeeze(-1)
    )
    with torch.no_grad():
        attention_mask = torch.cat([enc.attention_mask, mask], 1)
        logp, _, _ = aent.token_stats(model, out.sequences, attention_mask, mask, 0.7, 0.0, None, 4)
    torch.testing.assert_close(logp, expected * mask, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "drop_frac,top_k,temperature", [(0.33, None, 0.8), (0.0, None, 1.0), (0.0, 7, 1.3)]
)
def test_token_stats_and_their_gradients_match_a_float64_full_logits_reference(
    tiny, drop_frac, top_k, temperature
):
    model, _ = tiny
    torch.manual_seed(3)
    B, P, T, V = 3, 5, 7, model.config.vocab_size
    input_ids = torch.randint(3, V, (B, P + T))
    attention_mask = torch.ones(B, P + T, dtype=torch.long)
    attention_mask[0, :2] = 0  # a left-padded prompt
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # a completion that ended early
    attention_mask[:, P:] = mask
    w = torch.randn(2, B, T)

    model32 = model.train()
    logp, hc, hf = aent.token_stats(
        model32, input_ids, attention_mask, mask, temperature, drop_frac, top_k, 4
    )
    assert not hf.requires_grad  # the full entropy is logged, never differentiated
    ((w[0] * logp + w[1] * hc) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model32.named_parameters()}
    model32.zero_grad()

    model64 = plumbing.build_tiny(seed=0)[0].double().train()
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model64(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits[
            :, P - 1 : -1
        ]
        / temperature
    )
    ref_logp = logits.log_softmax(-1).gather(-1, input_ids[:, P:, None]).squeeze(-1)
    ref_hf = torch.distributions.Categorical(logits=logits).entropy()
    kept = logits.topk(top_k or V - int(drop_frac * V), dim=-1).values
    ref_hc = torch.distributions.Categorical(logits=kept).entropy()
    ((w[0] * ref_logp + w[1] * ref_hc) * mask).sum().backward()

    for got, ref in [(logp, ref_logp), (hc, ref_hc), (hf, ref_hf)]:
        torch.testing.assert_close(got.double(), ref.detach() * mask, rtol=1e-4, atol=1e-4)
    for name, p in model64.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-3, atol=1e-5)


def ref_head_stats(hidden, weight, bias, targets, temperature, k):
    """float64 log pi(y), clamped entropy (top k by a full sort) and full entropy, all N at once."""
    z = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) / temperature
    logp = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    kept = z.sort(-1, descending=True).values[:, :k]
    full = torch.distributions.Categorical(logits=z).entropy()
    return logp, torch.distributions.Categorical(logits=kept).entropy(), full


@pytest.mark.parametrize(
    "N,V,chunk,drop_frac,top_k,temperature,with_bias",
    [
        (37, 3001, 8, 0.33, None, 1.0, False),  # uneven last chunk, AEnt's drop fraction
        (20, 500, 64, 0.0, 20, 0.6, True),  # one chunk, top-k, a bias, T != 1
        (9, 257, 4, 0.0, None, 1.3, False),  # nothing dropped: clamped = full
    ],
)
def test_chunked_head_stats_match_float64_values_and_gradients_of_full_logits(
    N, V, chunk, drop_frac, top_k, temperature, with_bias
):
    torch.manual_seed(N)
    hidden = (torch.randn(N, 16) * 2).requires_grad_()
    weight = torch.randn(V, 16).requires_grad_()
    bias = torch.randn(V).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (N,))
    g = torch.randn(2, N)
    setting = (temperature, drop_frac, top_k, chunk)
    logp, hc, hf = aent.head_stats(hidden, targets, weight, bias, *setting)
    assert not hf.requires_grad  # the full entropy is logged, never differentiated
    (g[0] * logp + g[1] * hc).sum().backward()

    leaves = [
        t.detach().double().requires_grad_()
        for t in (hidden, weight) + ((bias,) if with_bias else ())
    ]
    k = top_k or V - int(drop_frac * V)
    r_logp, r_hc, r_hf = ref_head_stats(
        leaves[0], leaves[1], leaves[2] if with_bias else None, targets, temperature, k
    )
    (g[0] * r_logp + g[1] * r_hc).sum().backward()
    for got, ref in [(logp, r_logp), (hc, r_hc), (hf, r_hf)]:
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip([hidden, weight] + ([bias] if with_bias else []), leaves):
        torch.testing.assert_close(
            got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item()
        )
    with torch.no_grad():  # the scoring pass: log-probs only, the same numbers
        only = aent.head_stats(hidden, targets, weight, bias, *setting, entropies="skip")[0]
    torch.testing.assert_close(only, logp.detach(), rtol=0, atol=1e-6)


def test_head_stats_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = (
        torch.randn(24, 16, requires_grad=True),
        torch.randn(800, 16, requires_grad=True),
    )
    targets = torch.randint(0, 800, (24,))
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            logp, hc, hf = aent.head_stats(hidden, targets, weight, None, 1.0, 0.33, None, 10)
        (logp.sum() + hc.sum()).backward()  # outside autocast, as in training
        results.append([logp, hc, hf, hidden.grad.clone(), weight.grad.clone()])
        hidden.grad = weight.grad = None
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def peak_rss_mib_of(fn):
    """Peak resident memory (MiB) while fn runs, above the resident memory before it (Linux)."""
    import ctypes

    try:
        # glibc keeps freed blocks below its mmap threshold in the heap, so RSS would show
        # fragmentation rather than live tensors: serve every block of 1 MiB or more by mmap
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("needs Linux with glibc")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


@pytest.mark.parametrize("entropies", ["bonus", "log"])
def test_head_stats_memory_is_flat_in_the_number_of_tokens(entropies):
    torch.manual_seed(0)
    V, D = 20_000, 32
    weight = (torch.randn(V, D) * 0.1).requires_grad_()
    weight.grad = torch.zeros_like(weight)

    def forward_and_backward(n, chunk):
        hidden, targets = torch.randn(n, D, requires_grad=True), torch.randint(0, V, (n,))

        def run():
            logp, hc, _ = aent.head_stats(
                hidden, targets, weight, None, 1.0, 0.33, None, chunk, entropies
            )
            (logp.sum() + (hc.sum() if hc.requires_grad else 0)).backward()

        return peak_rss_mib_of(run)

    forward_and_backward(256, 128)  # warm-up: allocator and autograd caches
    small, large = forward_and_backward(256, 128), forward_and_backward(4096, 128)
    whole = forward_and_backward(4096, 4096)  # one chunk: all [4096, V] logits alive at once
    one_fp32_logits = 4096 * V * 4 / 2**20  # 312 MiB
    assert large < small + 0.1 * one_fp32_logits, (small, large)
    assert whole > one_fp32_logits > 2 * large, (whole, large)


def test_a_training_step_calls_clamped_entropy(tmp_path, monkeypatch):
    calls, real = [], aent.clamped_entropy

    def counted(logits, drop_frac=0.0, top_k=None):
        calls.append((tuple(logits.shape), drop_frac, top_k, torch.is_grad_enabled()))
        return real(logits, drop_frac, top_k)

    monkeypatch.setattr(aent, "clamped_entropy", counted)
    args = aent.parse_args(["--model", "tiny", "--steps", "1", "--out-dir", str(tmp_path / "run")])
    aent.train(args)
    bonus = [c for c in calls if c[1] == args.drop_frac and c[3]]  # the bonus, with gradient
    assert bonus and all(shape[-1] == 99 for shape, *_ in bonus)  # over the whole vocabulary


def test_rollout_samples_groups_and_ignores_the_checkpoints_generation_config(tiny):
    model, tokenizer = tiny
    model.generation_config.do_sample = False  # a checkpoint asking for greedy decoding
    model.generation_config.top_k = 1
    gen = aent.generation_config(tokenizer, [0], max_new_tokens=5)
    torch.manual_seed(0)
    roll = aent.rollout(
        model,
        tokenizer,
        ["Question: a\nAnswer:", "Question: bb\nAnswer:"],
        gen,
        group_size=8,
        batch_size=5,
    )
    assert roll["input_ids"].shape[0] == 16 and roll["mask"].shape == (16, 5)
    assert len(set(roll["completions"][:8])) > 1  # sampled, not greedy
    assert torch.equal(roll["attention_mask"][:, -5:], roll["mask"])


def test_rollout_ignores_every_other_sampling_field_of_the_checkpoint(tiny):
    model, tokenizer = tiny
    model.generation_config.no_repeat_ngram_size = (
        1  # would forbid any repeated token, prompt included
    )
    model.generation_config.repetition_penalty = 100.0
    model.generation_config.min_new_tokens = 20
    gen = aent.generation_config(tokenizer, [0], max_new_tokens=20)
    torch.manual_seed(0)
    roll = aent.rollout(model, tokenizer, ["Question: a\nAnswer:"], gen, group_size=16)
    prompt = set(roll["input_ids"][0, :-20].tolist())
    completions = roll["input_ids"][:, -20:][roll["mask"].bool()].tolist()
    assert prompt & set(completions)  # tokens from the prompt do get sampled
    assert model.generation_config.no_repeat_ngram_size == 1  # the model's own config is restored


def test_stop_token_ids_include_qwen_end_tokens(tiny):
    model, tokenizer = tiny
    ids = aent.stop_token_ids(model, tokenizer)
    assert set(ids) == {
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }


# ----------------------------------------------------------------------------------------------
# command line and the whole loop
# ----------------------------------------------------------------------------------------------
def test_help_explains_every_field():
    out = subprocess.run(
        [sys.executable, "aent.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout
    for f in dataclasses.fields(aent.Args):
        assert "--" + f.name.replace("_", "-") in out
        assert f.metadata["help"].split()[0] in out


def test_tiny_model_takes_demo_defaults_only_for_flags_not_given():
    args = aent.parse_args(["--model", "tiny", "--lr", "0.5"])
    assert args.lr == 0.5 and args.dataset == "toy" and args.steps == aent.TINY_DEMO["steps"]
    assert aent.parse_args(["--model", "x"]).lr == 2e-6
    assert aent.parse_args(["--no-adaptive-coef"]).adaptive_coef is False


def one_line_exit(fn, argv) -> str:
    """The message of the SystemExit that fn(argv) ends with, checked to be a single 'error:' line."""
    with pytest.raises(SystemExit) as stop:
        fn(argv)
    message = str(stop.value.code)
    assert message.startswith("error:") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--group-size", "1"], "group-size"),
        (["--drop-frac", "1.0"], "drop-frac"),
        (["--top-k", "0"], "top-k"),
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


def test_one_training_step_end_to_end_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--out-dir",
            str(out),
            "--sample-every",
            "1",
            "--mask-truncated",
            "--beta",
            "0.01",
        ]
    )
    before = plumbing.build_tiny(seed=0)[0].state_dict()
    model = aent.train(args)
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for key in [
        "reward",
        "entropy_clamped",
        "entropy_full",
        "entropy_coef",
        "clip_frac",
        "response_len",
        "step_time",
        "truncated_frac",
        "zero_var_frac",
    ]:
        assert all(math.isfinite(m[key]) for m in lines), key
    assert lines[0]["entropy_clamped"] < lines[0]["entropy_full"]
    assert (out / "samples.jsonl").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert any(not torch.equal(before[k], v) for k, v in loaded.state_dict().items() if k in before)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])


def test_a_saved_model_directory_trains_on_a_gsm8k_format_jsonl(tmp_path):
    model, tokenizer = plumbing.build_tiny(seed=1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many?",
            "answer": f"{a} + {b} = {a + b}\n#### {a + b:,}",
        }
        for a in range(4)
        for b in range(900, 1300, 100)
    ]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cmd = [
        sys.executable,
        "aent.py",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "train.jsonl"),
        "--out-dir",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--prompts-per-step",
        "4",
        "--group-size",
        "2",
        "--mini-batch-prompts",
        "2",
        "--max-new-tokens",
        "8",
        "--max-prompt-tokens",
        "128",
        "--lr",
        "1e-4",
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["step"] == 1
    assert os.path.isfile(tmp_path / "run" / "final" / "config.json")


def test_cpu_demo_learns_its_toy_task(tmp_path):
    """The README's demo, as run there: mean reward over the last 10 steps >= first 10 + 0.3."""
    aent.train(aent.parse_args(["--model", "tiny", "--out-dir", str(tmp_path / "demo")]))
    rewards = [json.loads(line)["reward"] for line in open(tmp_path / "demo" / "metrics.jsonl")]
    assert len(rewards) == aent.TINY_DEMO["steps"]
    assert sum(rewards[-10:]) / 10 >= sum(rewards[:10]) / 10 + 0.3


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


# ----------------------------------------------------------------------------------------------
# eval.py
# ----------------------------------------------------------------------------------------------
SHARED = os.path.join(HERE, "..", "shared", "data")


def shared_rows(name):
    path = os.path.join(SHARED, name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in open(path)]


def test_grader_accepts_every_math500_solution_and_rejects_shifted_answers():
    rows = shared_rows("math500_test.jsonl")
    assert sum(aent.grade(r["solution"], r["answer"]) for r in rows) == 500
    for r, other in zip(rows, rows[1:] + rows[:1]):
        if aent.grade(r["solution"], other["answer"]):  # only where the two answers really agree
            assert (
                aent.grade("\\boxed{" + r["answer"] + "}", other["answer"])
                and other["answer"].replace("x=", "") == r["answer"]
            )


def test_grader_accepts_every_gsm8k_test_gold_and_rejects_shifted_answers():
    rows = shared_rows("gsm8k_test.jsonl")
    golds = [plumbing.problem_from_row(r)["gold"] for r in rows]
    assert sum(aent.grade(r["answer"], g) for r, g in zip(rows, golds)) == 1319
    shifted = golds[1:] + golds[:1]
    accepted = [(g, s) for r, g, s in zip(rows, golds, shifted) if aent.grade(r["answer"], s)]
    assert all(g == s for g, s in accepted)


@pytest.mark.parametrize(
    "completion, gold, verdict",
    [
        ("\\boxed{\\frac{3}{4}}", "0.75", 1),
        ("\\boxed{0.75}", "\\dfrac34", 1),
        ("\\boxed{\\tfrac{3}{4}}", "\\frac{3}{4}", 1),
        ("\\boxed{y = -2}", "-2", 1),
        ("\\boxed{12,345}", "12345", 1),
        ("\\boxed{5\\text{ inches}}", "5", 1),
        ("\\boxed{\\$4.50}", "4.5", 1),
        ("\\boxed{[2, 5)}", "[2,5)", 1),
        ("\\boxed{(3,-1)}", "(3, -1)", 1),
        ("\\boxed{45^\\circ}", "45", 1),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
        ("\\boxed{\\frac{3}{5}}", "0.75", 0),
        ("\\boxed{[2, 5]}", "[2,5)", 0),
        ("\\boxed{(-1,3)}", "(3,-1)", 0),
        ("\\boxed{12,346}", "12345", 0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{12}", 0),
        ("\\boxed{46^\\circ}", "45", 0),
        ("\\boxed{10^{10^{10}}}", "3", 0),
        ("\\boxed{\\frac{1}{0}}", "3", 0),
        ("\\boxed{}", "3", 0),
    ],
)
def test_grader_on_equivalent_forms_and_near_misses(completion, gold, verdict):
    assert aent.grade(completion, gold) == verdict


# Each class of answer the grader once got wrong, written as models write it: the right value
# in the new form scores 1, a wrong value in the same form scores 0.
GRADER_CLASSES = {
    "final-answer statement, no box": [
        ("Therefore, the answer is ${}$.", "\\frac{3}{56}", "\\frac{3}{55}"),
        ("The answer is {}. Next we check: 3 + 4 = 7 and 12 - 5 = 7.", "18", "17"),
        ("Final Answer: The final answer is ${}$. I hope it is correct.", "6", "5"),
        ("**Answer:** {}\n\nSteps used 3 and 9.", "42", "24"),
        ("So the answer is: \\(x = {}\\)", "-2", "2"),
        ("We verify the answer is correct: 5 + 1 = 6.\nThe answer is {}.", "11", "6"),
    ],
    "units in the answer": [
        ("\\boxed{{\\text{{{} inches}}}}", "42", "41"),
        ("\\boxed{{{}\\text{{ cm}}^2}}", "5", "6"),
        ("\\boxed{{{} dollars}}", "18", "19"),
        ("\\boxed{{{} centimeters}}", "12", "21"),
        ("\\boxed{{{} \\text{{ inches per second}}}}", "10", "100"),
        ("\\boxed{{{} square units}}", "\\frac{3}{2}", "\\frac{2}{3}"),
        ("The answer is {} apples.", "18", "81"),
    ],
    "degrees": [
        ("\\boxed{{{}°}}", "30^\\circ", "31^\\circ"),
        ("\\boxed{{{} degrees}}", "45^\\circ", "54^\\circ"),
        ("\\boxed{{{}^{{\\circ}}}}", "120", "60"),
    ],
    "choice letters": [
        ("\\boxed{{\\text{{{} Plane}}}}", "\\text{(C)}", "\\text{(D)}"),
        ("\\boxed{{{}}}", "(B)", "(E)"),
        ("The answer is {}.", "\\text{(A)}", "\\text{(C)}"),
    ],
    "scientific notation": [
        ("\\boxed{{{} \\times 10^{{33}}}}", "4.5e33", "4.6e33"),
        ("\\boxed{{{}\\cdot10^{{-18}}}}", "2.88e-18", "2.87e-18"),
        ("\\boxed{{{} x 10^{{8}}}}", "3.0e8", "3.1e8"),
    ],
}


def grader_cases():
    for kind, rows in GRADER_CLASSES.items():
        for template, right, wrong in rows:
            letter = re.fullmatch(r"(?:\\text\{)?\(([A-E])\)\}?", right)
            for value, verdict in ((right, 1), (wrong, 0)):
                shown = value
                if letter:  # the model writes the letter the way the template shows it
                    shown = "(" + re.search(r"\(([A-E])\)", value).group(1) + ")"
                elif kind == "scientific notation":
                    shown = value.split("e")[0]
                elif kind == "degrees":
                    shown = value.replace("^\\circ", "")
                yield pytest.param(template.format(shown), right, verdict, id=f"{kind}-{verdict}")


@pytest.mark.parametrize("completion, gold, verdict", list(grader_cases()))
def test_grader_accepts_each_new_form_of_the_right_value_and_rejects_a_wrong_one(
    completion, gold, verdict
):
    assert aent.grade(completion, gold) == verdict


@pytest.mark.parametrize(
    "completion, gold, verdict",
    [
        ("\\boxed{2.88 \\times 10^{-18}}", "2.88 \\times 10^{-19}", 0),  # rounding equated these
        ("\\boxed{2.88 \\times 10^{-19}}", "2.88e-19", 1),
        ("\\boxed{3e8}", "3 \\times 10^{8}", 1),
        ("\\boxed{3E+9}", "3 \\times 10^{8}", 0),
        ("\\boxed{1000001}", "1000000", 0),
        ("\\boxed{13536}", "13535", 0),
        ("\\boxed{0.333333}", "\\frac{1}{3}", 0),  # plain numbers compare exactly
        ("\\boxed{1.50}", "\\frac{3}{2}", 1),
        ("\\boxed{12,345}", "12345", 1),
        ("\\boxed{2,3}", "23", 0),  # a list, not a thousands separator
        ("\\boxed{2 pi}", "2", 0),  # math words are not units
        ("\\boxed{\\text{(D) Plane}}", "\\text{(C)}", 0),
        ("the answer is the number of ways to choose them. So we get 10", "10", 1),
        ("\\boxed{" + "(" * 200 + "5" + ")" * 200 + "}", "5", 1),  # was a 5 s timeout
        ("\\boxed{" + "(" * 200 + "6" + ")" * 200 + "}", "5", 0),
        ("\\boxed{" + "{" * 60 + "84" + "}" * 60 + "}", "84", 1),
    ],
)
def test_grader_compares_plain_numbers_exactly_and_stays_strict(completion, gold, verdict):
    t0 = time.time()
    assert aent.grade(completion, gold) == verdict
    assert time.time() - t0 < 2


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{6xy}", "6"),  # letters after a number are a unit only if they name one
        ("\\boxed{(x+1) squared}", "x+1"),
        ("\\boxed{3 dozen}", "3"),
        ("\\boxed{0.5 percent}", "\\frac12"),
        ("\\boxed{100, 200}", "100200"),  # a list, not a thousands separator
        ("\\boxed{100200}", "100, 200"),
        ("\\boxed{3 4}", "34"),
        ("\\boxed{A B C D E}", "(A)"),  # several letters are not one choice
        ("\\boxed{A and C}", "(A)"),
        ("\\boxed{(A) (B) (C) (D) (E)}", "(A)"),
        ("The answer is 5. Wait, that is wrong: the answer is not 5, it is 6.", "5"),
        ("\\boxed{" + "1" * 5000 + "}", "1"),  # too many digits for int(): 0, not an exception
    ],
)
def test_grader_rejects_wrong_answers_that_normalisation_could_make_equal(completion, gold):
    assert aent.grade(completion, gold) == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 12 " + "apples remain after everything is distributed " * 3,
        "\\boxed{1" + "\\ " * 5000 + "x}",
        "\\boxed{" + "{" * 10000 + "}" * 10000 + "}",
        "the answer is not " * 7000,
        "\\boxed{" + "\\text{" * 15000 + "}",
        "\\boxed{" + " " * 20000 + "5 inches}",
    ],
)
def test_grader_time_stays_bounded_on_adversarial_answers(completion):
    t0 = time.time()
    aent.grade(completion, "12")
    assert time.time() - t0 < 2  # regexes outside math-verify's timeout must not backtrack


@pytest.mark.parametrize(
    "text, answer, source",
    [
        ("so \\boxed{7} and then 8", "7", "boxed"),
        ("cut off in \\boxed{12", None, None),
        ("The answer is $\\frac{1}{2}$. Also 3.", "\\frac{1}{2}", "statement"),
        ("so the answer is correct, 12", "12", "number"),
        ("no answer at all", None, None),
    ],
)
def test_find_answer_says_where_the_answer_came_from(text, answer, source):
    from grader import find_answer

    assert find_answer(text) == (answer, source)


# ----------------------------------------------------------------------------------------------
# The real Qwen2.5-Math-1.5B tokenizer and config, from ../shared/data when present
# ----------------------------------------------------------------------------------------------
QWEN = os.path.join(SHARED, "qwen2.5-math-1.5b")


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
        if name in plumbing.TOKENIZER_FILES:
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
        plumbing.problem_from_row({"question": "  What is 1+1? \n", "answer": "2"})["question"]
        == "What is 1+1?"
    )


def test_qwen_stops_on_endoftext_and_im_end_and_cuts_at_the_first(qwen_dir):
    model, tokenizer = aent.load_model(str(qwen_dir), torch.device("cpu"))
    eos = aent.stop_token_ids(model, tokenizer)
    assert eos == [151643, 151645]
    ids = tokenizer("12 apples", add_special_tokens=False).input_ids
    rows = torch.tensor([ids + [151645, 17, 151643], ids + [151643, 151645, 17]])
    mask = aent.completion_mask(rows, eos)
    assert mask.sum(1).tolist() == [len(ids) + 1] * 2  # up to and including the first stop id
    texts = tokenizer.batch_decode(rows.masked_fill(mask == 0, 151643), skip_special_tokens=True)
    assert texts == ["12 apples", "12 apples"]


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
        if name in plumbing.TOKENIZER_FILES:
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


def test_recipes_are_the_authors_published_settings_for_every_flag_not_given():
    r1 = aent.parse_args(["--recipe", "r1-distill"])
    want = dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", dataset="openr1", prompt="r1",
                drop_frac=0.25, entropy_coef=3e-4, h_low=0.35, h_high=0.62, coef_lr=1e-4,
                coef_warmup=156, coef_min=4e-5, coef_max=1e-3, prompts_per_step=256, group_size=8,
                mini_batch_prompts=64, ppo_epochs=1, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                max_prompt_tokens=1024, max_new_tokens=7168, temperature=1.0, top_p=1.0)  # fmt: skip
    assert {k: getattr(r1, k) for k in want} == want
    qwen = aent.parse_args(["--recipe", "qwen-math", "--lr", "3e-6"])
    want = dict(model="Qwen/Qwen2.5-Math-1.5B", dataset="math", prompt="verl", drop_frac=0.33,
                entropy_coef=0.002, h_low=0.15, h_high=0.24, coef_lr=0.002, coef_warmup=30,
                coef_min=6e-4, coef_max=9e-3, prompts_per_step=512, group_size=16,
                mini_batch_prompts=128, max_new_tokens=3072, lr=3e-6)  # fmt: skip
    assert {k: getattr(qwen, k) for k in want} == want  # a flag given wins over the recipe


R1_TEMPLATE = (  # DeepSeek-R1-Distill's template, reduced to what a math prompt uses
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def test_prompt_styles_for_qwen_math_the_verl_recipe_and_r1(tiny):
    tokenizer = plumbing.build_tiny()[1]
    tokenizer.chat_template, tokenizer.bos_token = R1_TEMPLATE, "<|endoftext|>"
    assert aent.build_prompt(tokenizer, "What is 1+1?", "r1") == (
        "<|endoftext|><｜User｜>What is 1+1?\nPlease reason step by step, and put your final "
        "answer within \\boxed{}.<｜Assistant｜><think>\n"
    )
    if not os.path.isdir(QWEN):
        pytest.skip(f"{QWEN} not present")
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(QWEN)
    assert aent.build_prompt(qwen, "What is 1+1?", "verl") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1? Let's think step by step and output "
        "the final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )  # the template's default system prompt, the recipe's instruction after the question


def test_eval_scores_a_checkpoint_with_its_training_prompt_and_length(tmp_path):
    import eval as ev

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"prompt": "r1", "max_new_tokens": 7168}))
    args = ev.parse_args(["--model", str(run / "final"), "--protocol", "aent"])
    assert (args.prompt, args.max_new_tokens, args.top_k, args.top_p) == ("r1", 7168, 20, 0.95)
    args = ev.parse_args(["--model", str(run / "final"), "--prompt", "qwen-math"])
    assert (args.prompt, args.max_new_tokens, args.top_k) == ("qwen-math", 7168, 0)
    args = ev.parse_args(["--model", "Qwen/Qwen2.5-Math-1.5B"])
    assert (args.prompt, args.max_new_tokens) == ("qwen-math", 2048)


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


def test_pass_at_k_matches_the_combinatorial_definition():
    import eval as ev

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(expected)


def test_complete_returns_completions_in_prompt_order_whatever_the_batching(tiny):
    import eval as ev

    model, tokenizer = tiny
    gen = aent.generation_config(tokenizer, [0], max_new_tokens=6, temperature=0)
    prompts = [
        "Question: a\nAnswer:",
        "Question: a much longer one\nAnswer:",
        "Q\nA:",
        "Question: 1+1\nAnswer:",
    ]
    together = ev.complete(model, tokenizer, prompts, gen, samples=1, batch_size=3)
    alone = [ev.complete(model, tokenizer, [p], gen)[0] for p in prompts]
    assert together == alone


def test_grading_in_worker_processes_agrees_with_grading_here():
    import eval as ev

    pairs = [
        ("\\boxed{0.5}", "\\frac12"),
        ("\\boxed{3}", "4"),
        ("so 1,600", "1600"),
        ("nothing", "1"),
    ]
    assert ev.grade_all(pairs, workers=2) == ev.grade_all(pairs, workers=0) == [1.0, 0.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = plumbing.build_tiny(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def test_eval_runs_end_to_end_on_a_checkpoint_and_writes_table_summary_and_predictions(
    tmp_path, tiny_dir
):
    rows = [
        {
            "problem": f"What is {a}+{a}?",
            "solution": f"\\boxed{{{2 * a}}}",
            "level": 1 + a % 2,
            "subject": "Algebra",
        }
        for a in range(5)
    ]
    bench = write_jsonl(tmp_path / "bench.jsonl", rows)
    cmd = [
        sys.executable,
        "eval.py",
        "--model",
        str(tiny_dir),
        "--benchmarks",
        bench,
        "--protocol",
        "aent",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--out-dir",
        str(tmp_path / "out"),
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pass@1" in res.stdout and "Level 1" in res.stdout and "Algebra" in res.stdout
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    result = summary["benchmarks"][bench]
    preds = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert (
        result["n"] == len(preds) == 5 and summary["samples"] == 4 and summary["temperature"] == 0.6
    )
    assert all(len(p["completions"]) == len(p["verdicts"]) == len(p["answers"]) == 4 for p in preds)
    assert [p["gold"] for p in preds] == [str(2 * a) for a in range(5)]
    assert result["pass@1"] == pytest.approx(sum(sum(p["verdicts"]) for p in preds) / 20)
    assert result["pass@4"] == pytest.approx(sum(any(p["verdicts"]) for p in preds) / 5)
    assert set(result["by_level"]) == {"Level 1", "Level 2"}
    sources = [s for p in preds for s in p["answer_from"]]
    assert result["completions"] == 20 and result["no_answer"] == sources.count(None)
    assert result["unboxed"] == sum(s in ("statement", "number") for s in sources)
    assert "no answer" in res.stdout and "unboxed (correct)" in res.stdout


@pytest.mark.parametrize(
    "bench_rows, model, words",
    [
        (None, "tiny_dir", "unknown benchmark"),
        (
            [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "q", "solution": "no box"}],
            "tiny_dir",
            "line 2",
        ),
        ([{"problem": "p", "answer": "1"}, "{not json"], "tiny_dir", "line 2"),
        ([{"problem": "p", "answer": "1"}], "no_tokenizer", "no tokenizer"),
    ],
)
def test_eval_bad_input_is_one_line_error(tmp_path, tiny_dir, bench_rows, model, words):
    bench = "gsm9k" if bench_rows is None else write_jsonl(tmp_path / "b.jsonl", bench_rows)
    if model == "no_tokenizer":
        model_dir = tmp_path / "m"
        plumbing.build_tiny()[0].save_pretrained(model_dir)
    else:
        model_dir = tiny_dir
    cmd = [
        sys.executable,
        "eval.py",
        "--model",
        str(model_dir),
        "--benchmarks",
        bench,
        "--out-dir",
        str(tmp_path / "out"),
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_training_logs_held_out_accuracy_with_eval_every(tmp_path):
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--eval-size",
            "3",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    aent.train(args)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert "eval_accuracy" not in lines[0] and 0.0 <= lines[1]["eval_accuracy"] <= 1.0


# ----------------------------------------------------------------------------------------------
# robustness: resume, checkpoints, signals, numerics, bad input
# ----------------------------------------------------------------------------------------------
def run_aent(*flags):
    return subprocess.run(
        [sys.executable, "aent.py", *flags],
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_tiny_tokenizer_reloads_from_a_saved_checkpoint_unchanged(tiny_dir):
    from transformers import AutoTokenizer

    text = "Question: Tom has 3 apples.\nAnswer: <|im_end|>"
    assert (
        AutoTokenizer.from_pretrained(tiny_dir)(text).input_ids
        == plumbing.build_tiny()[1](text).input_ids
    )


def wait_for_checkpoint(out_dir, newer_than, proc, timeout=180):
    start = time.time()
    while time.time() - start < timeout and proc.poll() is None:
        latest = plumbing.latest_checkpoint(str(out_dir))
        state = plumbing.load_state(latest) if latest else None
        if state and state["step"] > newer_than:
            return state["step"]
        time.sleep(0.05)
    return newer_than


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "8"]], ids=["full", "lora"])
def test_a_run_killed_at_random_moments_resumes_to_the_same_weights_as_an_uninterrupted_one(
    tmp_path, lora
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    flags = ["--model", "tiny", "--steps", "10", "--save-every", "1", "--keep-last", "3",
             "--sample-every", "2", *lora]  # fmt: skip
    assert run_aent(*flags, "--out-dir", str(tmp_path / "straight")).returncode == 0
    rng, step = random.Random(0), 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "aent.py", *flags, "--out-dir", str(tmp_path / "killed")],
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        step = wait_for_checkpoint(tmp_path / "killed", step, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside a step, or inside a checkpoint write
        proc.kill()
        proc.wait()
    assert 0 < step < 10  # the kills did land mid-run
    assert run_aent(*flags, "--out-dir", str(tmp_path / "killed")).returncode == 0

    for weights in ["model.safetensors"] + ["adapter/adapter_model.safetensors"] * bool(lora):
        straight = load_file(tmp_path / "straight" / "final" / weights)
        killed = load_file(tmp_path / "killed" / "final" / weights)
        assert straight.keys() == killed.keys()
        assert all(torch.equal(straight[k], killed[k]) for k in straight)
    lines = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    reference = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == list(range(1, 11))
    assert [(m["reward"], m["loss"]) for m in lines] == [
        (m["reward"], m["loss"]) for m in reference
    ]
    assert [json.loads(line)["step"] for line in open(tmp_path / "killed" / "samples.jsonl")] == [
        s for s in (1, 2, 4, 6, 8, 10) for _ in range(3)
    ]
    checkpoints = [
        d for d in os.listdir(tmp_path / "killed") if d.startswith("step_") or d == "final"
    ]
    assert "final" in checkpoints and len(checkpoints) <= 4
    for d in checkpoints:
        if not d.endswith(".tmp"):
            assert plumbing.checkpoint_problem(str(tmp_path / "killed" / d)) is None
            if d == "final" or not lora:  # a LoRA step checkpoint holds the adapters alone
                AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / d)


def sigterm_once_a_step_is_logged(out, steps):
    """Start a tiny run, send SIGTERM as soon as its first step is logged; (returncode, stdout, stderr).
    Steps of 1024 sequences take long enough here for the signal to land inside step 2."""
    flags = [
        "--model",
        "tiny",
        "--steps",
        str(steps),
        "--save-every",
        "0",
        "--prompts-per-step",
        "64",
        "--out-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "aent.py", *flags],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    start = time.time()
    while not (out / "metrics.jsonl").exists() and time.time() - start < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = sigterm_once_a_step_is_logged(out, steps=200)
    assert code == 0, stderr[-2000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "rerun to resume" in last
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert (
        torch.load(
            os.path.join(plumbing.latest_checkpoint(str(out)), "trainer_state.pt"),
            weights_only=True,
        )["step"]
        == steps[-1]
    )


def test_non_finite_updates_are_skipped_then_the_run_stops_without_a_bad_checkpoint(
    tmp_path, monkeypatch
):
    real = aent.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **kw):
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 1 or calls["n"] > 4 else loss), stats

    monkeypatch.setattr(aent, "policy_loss", sometimes_nan)
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "10",
            "--save-every",
            "1",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(SystemExit) as stop:
        aent.train(args)
    assert "non-finite" in str(stop.value) and "without saving" in str(stop.value)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert (
        lines[0]["skipped_updates"] == 1 and lines[0]["step"] == 1
    )  # the first update skipped, the second applied
    for d in os.listdir(tmp_path / "run"):
        if d.startswith("step_"):
            from safetensors.torch import load_file

            assert all(
                torch.isfinite(t).all()
                for t in load_file(tmp_path / "run" / d / "model.safetensors").values()
            )


def test_an_output_directory_holding_a_different_run_is_refused(tmp_path):
    out = str(tmp_path / "run")
    aent.main(["--model", "tiny", "--steps", "1", "--out-dir", out])
    assert "--lr" in one_line_exit(
        aent.main, ["--model", "tiny", "--steps", "2", "--lr", "0.5", "--out-dir", out]
    )
    aent.main(
        ["--model", "tiny", "--steps", "2", "--out-dir", out]
    )  # same settings, more steps: resumes
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    del saved["lora_rank"], saved["lora_alpha"]  # a run from before these flags existed
    (tmp_path / "run" / "args.json").write_text(json.dumps(saved))
    aent.main(["--model", "tiny", "--steps", "3", "--out-dir", out])  # resumes: they are defaults
    assert one_line_exit(aent.main, ["--model", "tiny", "--steps", "4", "--lora-rank", "8",
                                     "--out-dir", out]).count("--lora-rank")  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "missing_dir",
        "unknown_hub_id",
        "missing_file",
        "binary_file",
        "bad_json",
        "no_gold",
        "too_long",
        "context",
    ],
)
def test_bad_training_input_is_one_line_error_before_any_work(tmp_path, tiny_dir, case):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})] * 3
    flags = [
        "--model",
        str(tiny_dir),
        "--dataset",
        str(data),
        "--max-new-tokens",
        "8",
        "--prompts-per-step",
        "2",
        "--mini-batch-prompts",
        "1",
    ]
    if case == "missing_dir":
        flags[1], words = str(tmp_path / "nope"), "does not exist"
    elif case == "unknown_hub_id":
        flags[1], words = "nobody/no-such-model", "cannot load model"
    elif case == "missing_file":
        flags[3], words = str(tmp_path / "absent.jsonl"), "not found"
    elif case == "binary_file":
        data.write_bytes(b"\xff\xfe\x00garbage\n")
        words = "line 1"
    elif case == "bad_json":
        rows[1], words = '{"question": "x", ', "line 2"
    elif case == "no_gold":
        rows[2], words = json.dumps({"question": "What is 1 + 1?"}), "line 3"
    elif case == "too_long":
        flags += ["--max-prompt-tokens", "20", "--long-prompts", "error"]
        words = "longer than --max-prompt-tokens"
    elif case == "context":
        flags[5], words = "5000", "exceeds the model's context"
    if case != "binary_file":
        data.write_text("\n".join(rows) + "\n")
    message = one_line_exit(aent.main, [*flags, "--out-dir", str(tmp_path / "out")])
    assert words in message
    assert not (tmp_path / "out").exists()


def test_long_prompts_are_skipped_with_a_count_by_default(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"question": q, "answer": "#### 4"}) for q in ["2+2?", "2+2?", "x" * 100]
        )
        + "\n"
    )
    res = run_aent(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(data),
        "--max-prompt-tokens",
        "40",
        "--max-new-tokens",
        "4",
        "--steps",
        "1",
        "--prompts-per-step",
        "2",
        "--mini-batch-prompts",
        "1",
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stderr[-1500:]
    assert "skipped 1 of 3 prompts longer than 40 tokens" in res.stdout


def test_dataset_errors_come_before_the_model_is_loaded(tmp_path):
    message = one_line_exit(
        aent.main,
        [
            "--model",
            "nobody/no-such-model",
            "--dataset",
            str(tmp_path / "absent.jsonl"),
            "--out-dir",
            str(tmp_path / "o"),
        ],
    )
    assert "absent.jsonl" in message


def test_an_out_dir_that_is_a_file_or_holds_foreign_output_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_exit(
        aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "file")]
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.jsonl").write_text("hi\n")
    assert "no args.json" in one_line_exit(
        aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "foreign")]
    )
    assert (tmp_path / "foreign" / "metrics.jsonl").read_text() == "hi\n"


def test_a_step_with_every_completion_masked_out_changes_neither_weights_nor_coefficient(tmp_path):
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--max-new-tokens",
            "1",
            "--mask-truncated",
            "--group-size",
            "2",
            "--prompts-per-step",
            "2",
            "--mini-batch-prompts",
            "1",
            "--coef-warmup",
            "1",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    before = plumbing.build_tiny(seed=0)[0].state_dict()
    model = aent.train(args)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(m["truncated_frac"] == 1.0 for m in lines)  # one new token, never an EOS here
    assert (
        all(math.isnan(m["entropy_clamped"]) for m in lines)
        and [m["entropy_coef"] for m in lines] == [args.entropy_coef] * 2
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_signal_during_the_last_step_still_writes_final(tmp_path, monkeypatch, capsys):
    stop, real, calls = aent.StopRequest(), aent.policy_update, []

    def update(*a, **k):  # the signal lands inside the last step's update
        calls.append(1)
        if len(calls) == 2:
            stop.requested = "SIGTERM"
        return real(*a, **k)

    monkeypatch.setattr(aent, "policy_update", update)
    out = tmp_path / "run"
    aent.train(
        aent.parse_args(
            ["--model", "tiny", "--steps", "2", "--save-every", "0", "--out-dir", str(out)]
        ),
        stop,
    )
    assert (out / "final" / "trainer_state.pt").exists() and not list(out.glob("step_*"))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: 2 steps")


# ----------------------------------------------------------------------------------------------
# bench.py runs end to end (a miniature preset; the real figures come from `python bench.py`)
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# A hostile world: a second run, damaged checkpoints, a full disk, unwritable directories
# ----------------------------------------------------------------------------------------------
def tiny_args(out, *flags):
    return aent.parse_args(["--model", "tiny", "--out-dir", str(out), *flags])


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    hold = "import plumbing, sys, time; plumbing.claim_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], cwd=HERE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_aent("--model", "tiny", "--steps", "1", "--out-dir", str(out))
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: another run (pid {holder.pid}) is using --out-dir {out}; wait for it to end"
        ]
        assert os.listdir(out) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    res = run_aent("--model", "tiny", "--steps", "1", "--out-dir", str(out))  # the lock died too
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A finished 3-step tiny run with step_000001/, step_000002/ and final/ (step 3)."""
    out = tmp_path_factory.mktemp("three") / "run"
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    return out


def truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


DAMAGE = {
    "empty trainer_state.pt": lambda d: truncate(d / "trainer_state.pt", 0),
    "truncated trainer_state.pt": lambda d: truncate(d / "trainer_state.pt", 0.5),
    "truncated optimizer.pt": lambda d: truncate(d / "optimizer.pt", 0.9),
    "missing optimizer.pt": lambda d: os.remove(d / "optimizer.pt"),
    "truncated model.safetensors": lambda d: truncate(d / "model.safetensors", 0.99),
    "missing model.safetensors": lambda d: os.remove(d / "model.safetensors"),
    "missing config.json": lambda d: os.remove(d / "config.json"),
    "damaged config.json": lambda d: truncate(d / "config.json", 0.5),
    "missing tokenizer": lambda d: [os.remove(d / f) for f in os.listdir(d) if "token" in f],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_intact_one(
    tmp_path, three_steps, damage, capsys
):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    want = {k: v.clone() for k, v in load_file(out / "final" / "model.safetensors").items()}
    DAMAGE[damage](out / "final")
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    printed = capsys.readouterr().out
    assert f"passing over the damaged checkpoint {out / 'final'} (it" in printed
    assert f"resuming from {out / 'step_000002'} (step 2)" in printed
    got = load_file(out / "final" / "model.safetensors")  # step 3 redone from step 2
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_damaged_newer_checkpoints_are_set_aside_so_keep_last_keeps_good_ones(
    tmp_path, three_steps
):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    truncate(out / "final" / "optimizer.pt", 0.5)
    truncate(out / "step_000002" / "model.safetensors", 0.5)
    aent.train(tiny_args(out, "--steps", "5", "--save-every", "1", "--keep-last", "2"))
    names = sorted(os.listdir(out))
    assert "final.damaged" in names and "step_000002.damaged" in names
    kept = [n for n in names if n.startswith("step_") and "." not in n] + ["final"]
    assert kept == ["step_000003", "step_000004", "final"]
    assert all(plumbing.checkpoint_problem(str(out / n)) is None for n in kept)


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_and_keeps_its_logs(
    tmp_path, three_steps
):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    for name in ("step_000001", "step_000002", "final"):
        truncate(out / name / "optimizer.pt", 0.5)
    logs = (out / "metrics.jsonl").read_text()
    message = one_line_exit(aent.main, ["--model", "tiny", "--steps", "3", "--save-every", "1",
                                        "--keep-last", "3", "--out-dir", str(out)])  # fmt: skip
    assert message.startswith(f"error: no checkpoint in {out} can be resumed: ")
    assert "step_000001 (its optimizer.pt is missing or damaged)" in message
    assert (out / "metrics.jsonl").read_text() == logs


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


def test_a_full_disk_while_saving_is_one_line_that_names_the_kept_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    aent.train(tiny_args(out, "--steps", "2", "--save-every", "1"))
    real_save = torch.save

    def full(obj, path, *a, **kw):
        if "step_000003.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    args = tiny_args(out, "--steps", "4", "--save-every", "1")
    message = one_line_exit(lambda _: aent.train(args), None)
    assert message.startswith(f"error: cannot write {out / 'step_000003'}: ")
    assert f"the last checkpoint is {out / 'final'}" in message  # step 2 of the first run
    assert not (out / "step_000003.tmp").exists() and not (out / "step_000003").exists()
    assert plumbing.latest_checkpoint(str(out)) == str(out / "final")


def test_a_really_full_disk_stops_in_one_line_and_the_run_resumes_once_there_is_room(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a 4 MB tmpfs here (needs root)")
    try:
        out = small / "run"  # a tiny checkpoint is about 1.6 MB: the third does not fit
        flags = ("--model", "tiny", "--steps", "5", "--save-every", "1", "--out-dir", str(out))
        res = run_aent(*flags)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, res.stderr[-2000:]
        assert lines[0].startswith(f"error: cannot write {out / 'step_000003'}: the disk is full")
        assert f"the last checkpoint is {out / 'step_000002'}" in lines[0]
        assert sorted(os.listdir(out)) == [".lock", "args.json", "metrics.jsonl",
                                           "samples.jsonl", "step_000001", "step_000002"]  # fmt: skip
        shutil.rmtree(out / "step_000001")  # room for a second checkpoint beside step_000002
        res = run_aent(*flags, "--keep-last", "1")  # and a run of one needs no more than that
        assert res.returncode == 0, res.stderr[-2000:]
        assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_an_unwritable_out_dir_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "run")
    message = one_line_exit(aent.main, ["--model", "nobody/no-such-model", "--out-dir", out])
    assert message == f"error: cannot write to --out-dir {out}: Not a directory"
    cmd = [sys.executable, "eval.py", "--model", "nobody/no-such-model", "--out-dir", out]
    res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [message]


def test_weights_made_non_finite_by_an_update_are_one_line_and_never_saved(tmp_path, monkeypatch):
    real = aent.policy_update

    def overflowing(model, *a, **kw):  # an update that ends with an infinite weight
        out = real(model, *a, **kw)
        with torch.no_grad():
            next(model.parameters())[0, 0] = math.inf
        return out

    monkeypatch.setattr(aent, "policy_update", overflowing)
    out = tmp_path / "run"
    message = one_line_exit(lambda _: aent.train(tiny_args(out, "--save-every", "1")), None)
    assert message.startswith("error: the weights are no longer finite after step 1")
    assert "no checkpoint was written" in message and not plumbing.latest_checkpoint(str(out))


def test_a_huge_prompt_is_measured_as_too_long_without_being_tokenized(tiny):
    _, tokenizer = tiny
    prompts = ["Question: Repeat 7\nAnswer:", "Repeat " * 2_000_000, "a b " * 20]
    t0 = time.time()
    lengths = plumbing.prompt_lengths(tokenizer, prompts, limit=64)
    assert time.time() - t0 < 2
    exact = [len(ids) for ids in tokenizer(prompts[::2], add_special_tokens=False).input_ids]
    assert lengths == [exact[0], 65, exact[1]] and exact[1] > 64  # over, but counted exactly


def test_an_interrupt_reports_whether_a_checkpoint_exists(tmp_path, three_steps):
    for out, note in [(tmp_path, "no checkpoint was written"),
                      (three_steps, f"the last checkpoint is {three_steps / 'final'}")]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            with plumbing.StopRequest(str(out)):
                raise KeyboardInterrupt
        assert stop.value.code == f"interrupted ({note})"


def test_ctrl_c_while_the_libraries_import_exits_without_a_traceback():
    proc = subprocess.Popen(
        [sys.executable, "aent.py", "--help"], cwd=HERE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the imports finished before the signal")
    assert proc.returncode == -signal.SIGINT and "Traceback" not in stderr


# ----------------------------------------------------------------------------------------------
# Data parallel: torchrun with gloo on CPU
# ----------------------------------------------------------------------------------------------
def torchrun(*argv, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    return subprocess.run(
        cmd + [str(a) for a in argv], cwd=HERE, capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


SAME_WEIGHTS = """
import json, sys, torch, torch.distributed as dist
import aent
real, same = aent.policy_update, []

def checked(model, *args, **kwargs):  # after each step's updates: the weights of every rank
    out = real(model, *args, **kwargs)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    same.append(all(torch.equal(parts[0], x) for x in parts))
    return out

aent.policy_update = checked
aent.main(sys.argv[2:])
if dist.get_rank() == 0:
    json.dump(same, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "8"]], ids=["full", "lora"])
def test_two_processes_train_log_each_step_once_and_keep_identical_weights(tmp_path, lora):
    from transformers import AutoModelForCausalLM

    script, report, out = tmp_path / "same.py", tmp_path / "same.json", tmp_path / "run"
    script.write_text(SAME_WEIGHTS)
    flags = ["--model", "tiny", "--steps", "6", "--save-every", "2", "--out-dir", out, *lora]
    res = torchrun(script, report, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(report)) == [True] * 6  # identical on both ranks after every step
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert res.stdout.count("step    3 |") == 1  # rank 0 alone prints
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


EQUAL_UPDATE = """
import sys, torch
import aent, plumbing

# One step's update of the same 4 groups x 4 rollouts, on one process or split over two.
rank, world, _ = plumbing.init_distributed()
args = aent.parse_args(["--model", "tiny", "--group-size", "4", "--prompts-per-step", "4",
                        "--mini-batch-prompts", "4", "--micro-batch-size", "3",
                        "--ppo-epochs", "2", "--max-new-tokens", "3"])
model, tokenizer = plumbing.build_tiny(0)
torch.manual_seed(0)  # the same rollouts on every rank; each takes its own groups
gen = aent.generation_config(tokenizer, aent.stop_token_ids(model, tokenizer), 3)
prompts = [aent.build_prompt(tokenizer, f"Repeat {d}") for d in range(4)]
roll = aent.rollout(model, tokenizer, prompts, gen, group_size=4)
rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
adv = aent.group_advantages(rewards, 4)
rows = slice(16 // world * rank, 16 // world * (rank + 1))
part = {k: v[rows] for k, v in roll.items() if torch.is_tensor(v)}
opt = torch.optim.SGD(model.parameters(), lr=1.0)  # Adam would magnify rounding of tiny grads
torch.manual_seed(1)
aent.policy_update(model, opt, part, part["mask"], adv[rows], 0.01, args)
if rank == 0:
    torch.save(dict(model.state_dict()), sys.argv[1])
plumbing.barrier()  # no process exits while another still works
"""


def test_a_two_process_update_equals_a_one_process_update_of_the_whole_batch(tmp_path):
    script = tmp_path / "equal.py"
    script.write_text(EQUAL_UPDATE)
    res = torchrun(script, tmp_path / "two.pt")
    assert res.returncode == 0, res.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=HERE,
                         env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    start = plumbing.build_tiny(0)[0].state_dict()
    for k in one:
        assert not torch.equal(one[k], start[k])  # the update moved every tensor
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_torchrun_stops_every_rank_at_one_step_on_sigterm_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "aent.py", "--model", "tiny", "--steps", "200", "--save-every", "0", "--out-dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    start = time.time()
    while time.time() - start < 300 and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(open(out / "metrics.jsonl").readlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "rerun to resume" in last
    stopped = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert [n for n in os.listdir(out) if n.startswith("step_")] == [f"step_{stopped[-1]:06d}"]
    res = torchrun("aent.py", "--model", "tiny", "--steps", stopped[-1] + 2, "--save-every", "0",
                   "--out-dir", out)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, stopped[-1] + 3)) and (out / "final").is_dir()


def test_bad_input_under_torchrun_is_one_error_line_from_rank_0(tmp_path):
    res = torchrun("aent.py", "--model", "tiny", "--prompts-per-step", "6", "--mini-batch-prompts",
                   "3", "--out-dir", tmp_path / "run")  # fmt: skip
    assert res.returncode != 0
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --mini-batch-prompts must be a multiple of the 2 processes"]
    assert not (tmp_path / "run").exists()


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


def test_bench_runs_trl_side_by_side_when_it_is_installed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    out = run_bench(tmp_path, monkeypatch, "--vs-trl", "--no-pass")
    assert (
        0 < out["trl"]["tokens"] <= 2 * 2 * 3
        and out["ratios"]["step_time"] == out["ours"]["step_time"] / out["trl"]["step_time"]
    )
    assert "ratio" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# LoRA through peft: --lora-rank
# ----------------------------------------------------------------------------------------------
def lora_base():
    """The frozen base of the tiny LoRA demo: the tiny model with its confident head."""
    model, _ = plumbing.build_tiny(0)
    plumbing.confident_tiny_head(model)
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

    model, tokenizer = plumbing.build_tiny(0)
    seven = tokenizer.convert_tokens_to_ids("7")
    assert best_probability(model, seven) < 0.06
    assert best_probability(lora_base(), seven) > 0.9


def test_lora_demo_learns_and_its_final_is_a_plain_model_with_the_adapters_merged(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import eval as ev

    out = tmp_path / "lora"
    args = aent.parse_args(["--model", "tiny", "--lora-rank", "8", "--out-dir", str(out)])
    model = aent.train(args)
    rewards = [json.loads(line)["reward"] for line in open(out / "metrics.jsonl")]
    assert len(rewards) == aent.TINY_DEMO["steps"]
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
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        trained = model(ids).logits  # the model as training left it
        assert torch.equal(adapted(ids).logits, trained)
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
    stop = plumbing.StopRequest()
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
    assert plumbing.checkpoint_problem(str(step)) is None
    import eval as ev
    from peft import PeftModel

    scored, _ = ev.load_checkpoint(str(step), torch.device("cpu"))  # the run's base + adapters
    trained = PeftModel.from_pretrained(lora_base(), step / "adapter")
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(scored(ids).logits, trained(ids).logits)
    shutil.copytree(step, tmp_path / "moved")  # away from its run's args.json: one error line
    assert "LoRA adapters" in plumbing.saved_model_problem(str(tmp_path / "moved"))
    os.remove(step / "adapter" / "adapter_model.safetensors")
    assert plumbing.checkpoint_problem(str(step)).startswith("adapter/: it has no weights")


def test_lora_beta_scores_the_base_with_adapters_off_and_loads_no_second_model(
    tmp_path, monkeypatch
):
    loaded, pairs = [], []
    load, kl = aent.load_model, aent.kl_penalty
    monkeypatch.setattr(
        aent, "load_model", lambda name, *a, **k: loaded.append(name) or load(name, *a, **k)
    )
    monkeypatch.setattr(aent, "kl_penalty", lambda logp, ref: pairs.append((logp.detach(), ref)) or kl(logp, ref))  # fmt: skip
    out = tmp_path / "run"
    aent.train(tiny_args(out, "--lora-rank", "8", "--beta", "0.1", "--steps", "2"))
    assert loaded == ["tiny"]  # the policy's base, once
    logp, ref = pairs[0]  # before the first update B = 0: the policy is the base
    assert torch.equal(logp, ref)
    assert not torch.equal(*pairs[-1])  # later the adapters move the policy away from it
    kls = [json.loads(line)["kl_ref"] for line in open(out / "metrics.jsonl")]
    assert all(k > 0 and math.isfinite(k) for k in kls)
