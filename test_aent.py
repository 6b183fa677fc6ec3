"""The specification of the method in aent.py: the functions a reader copies, against float64
references written independently (sorting, explicit loops), the chunked log-prob and entropy
pass, and one training step end to end. Run, offline, on the CPU."""

import json
import math

import pytest
import torch

import aent
from support.demo import build_tiny


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


def test_aent_loss_is_ppo_minus_lambda_times_token_mean_entropy_plus_beta_k3_kl():
    torch.manual_seed(11)
    B, T, coef, beta = 6, 9, 0.03, 0.2
    old = torch.randn(B, T) - 2
    logp = (old + torch.randn(B, T)).requires_grad_()
    entropy = (torch.rand(B, T) * 3).requires_grad_()
    adv, ref = torch.randn(B), old + torch.randn(B, T) * 0.5
    mask = (torch.rand(B, T) > 0.3).long()
    clip = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    loss, stats = aent.aent_loss(
        logp, old, adv, mask, entropy, coef, ref_logp=ref, beta=beta, **clip
    )

    ppo = ref_policy_loss(logp.detach(), old, adv, mask, 0.2, 0.28, 3.0)
    tokens = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    h = sum(entropy[b, t].item() for b, t in tokens) / len(tokens)
    d = [ref[b, t].item() - logp[b, t].item() for b, t in tokens]
    kl = sum(math.exp(x) - x - 1 for x in d) / len(tokens)
    assert loss.item() == pytest.approx(ppo - coef * h + beta * kl, rel=1e-5, abs=1e-6)
    assert stats["kl_ref"].item() == pytest.approx(kl, rel=1e-5)
    loss.backward()  # the bonus's gradient: -lambda / (number of tokens) on each kept token
    torch.testing.assert_close(entropy.grad, -coef * mask / len(tokens))


def test_aent_loss_without_a_bonus_is_the_policy_loss_and_leaves_the_entropy_alone():
    torch.manual_seed(12)
    logp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4)
    mask, entropy = torch.ones(4, 5), torch.rand(4, 5).requires_grad_()
    loss, stats = aent.aent_loss(logp, old, adv, mask, entropy, coef=0.0)
    assert torch.equal(loss, aent.policy_loss(logp, old, adv, mask)[0]) and "kl_ref" not in stats
    assert not loss.requires_grad  # no graph through the entropy when lambda is 0


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
        logp, *_ = aent.token_stats(model, out.sequences, attention_mask, mask, 0.7, 0.0, None, 4)
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
    logp, hc, hf, dropped = aent.token_stats(
        model32, input_ids, attention_mask, mask, temperature, drop_frac, top_k, 4
    )
    assert not hf.requires_grad  # the full entropy is a value to log
    ((w[0] * logp + w[1] * hc) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model32.named_parameters()}
    model32.zero_grad()

    model64 = build_tiny(seed=0)[0].double().train()
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
    ref_dropped = 1 - (kept.logsumexp(-1) - logits.logsumexp(-1)).exp()
    ((w[0] * ref_logp + w[1] * ref_hc) * mask).sum().backward()

    for got, ref in [(logp, ref_logp), (hc, ref_hc), (hf, ref_hf), (dropped, ref_dropped)]:
        torch.testing.assert_close(got.double(), ref.detach() * mask, rtol=1e-4, atol=1e-4)
    for name, p in model64.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-3, atol=1e-5)


def ref_head_stats(hidden, weight, bias, targets, temperature, k):
    """float64 log pi(y), clamped entropy (top k by a full sort), full entropy and the probability
    outside the top k (summed from the sorted probabilities), all N at once."""
    z = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) / temperature
    logp = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    kept = z.sort(-1, descending=True).values[:, :k]
    full = torch.distributions.Categorical(logits=z).entropy()
    dropped = z.softmax(-1).sort(-1, descending=True).values[:, k:].sum(-1)
    return logp, torch.distributions.Categorical(logits=kept).entropy(), full, dropped


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
    logp, hc, hf, dropped = aent.head_stats(hidden, targets, weight, bias, *setting)
    assert not hf.requires_grad  # the full entropy is a value to log
    (g[0] * logp + g[1] * hc).sum().backward()

    leaves = [
        t.detach().double().requires_grad_()
        for t in (hidden, weight) + ((bias,) if with_bias else ())
    ]
    k = top_k or V - int(drop_frac * V)
    r_logp, r_hc, r_hf, r_dropped = ref_head_stats(
        leaves[0], leaves[1], leaves[2] if with_bias else None, targets, temperature, k
    )
    (g[0] * r_logp + g[1] * r_hc).sum().backward()
    for got, ref in [(logp, r_logp), (hc, r_hc), (hf, r_hf), (dropped, r_dropped)]:
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip([hidden, weight] + ([bias] if with_bias else []), leaves):
        torch.testing.assert_close(
            got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item()
        )
    with torch.no_grad():  # the scoring pass: log-probs only, the same numbers
        only = aent.head_stats(hidden, targets, weight, bias, *setting, entropies=False)[0]
    torch.testing.assert_close(only, logp.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "drop_frac,top_k,temperature",
    [(0.33, None, 1.0), (0.9, None, 0.6), (0.0, 10, 1.4), (0.0, 1, 1.0)],
)
def test_dropped_mass_is_the_probability_outside_the_kept_set_ties_included(
    drop_frac, top_k, temperature
):
    torch.manual_seed(21)
    N, V = 30, 1000
    hidden = torch.randint(-2, 3, (N, 8)).float()  # small integers: many tied logits
    weight = torch.randint(-2, 3, (V, 8)).float()
    targets = torch.randint(0, V, (N,))
    k = top_k or V - int(drop_frac * V)
    *_, want = ref_head_stats(hidden, weight, None, targets, temperature, k)
    _, _, _, dropped = aent.head_stats(
        hidden, targets, weight, None, temperature, drop_frac, top_k, 7
    )
    assert (hidden @ weight.T).unique().numel() < 100  # ties at the edge of the kept set
    torch.testing.assert_close(dropped.double(), want, rtol=1e-5, atol=1e-6)
    nothing = aent.head_stats(hidden, targets, weight, None, temperature, 0.0, None, 7)[3]
    assert torch.equal(nothing, torch.zeros(N))  # nothing dropped: no mass outside


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
            logp, hc, hf, dropped = aent.head_stats(
                hidden, targets, weight, None, 1.0, 0.33, None, 10
            )
        (logp.sum() + hc.sum()).backward()  # outside autocast, as in training
        results.append([logp, hc, hf, dropped, hidden.grad.clone(), weight.grad.clone()])
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


@pytest.mark.parametrize("entropies", [True, False])
def test_head_stats_memory_is_flat_in_the_number_of_tokens(entropies):
    torch.manual_seed(0)
    V, D = 10_000, 32
    weight = (torch.randn(V, D) * 0.1).requires_grad_()
    weight.grad = torch.zeros_like(weight)

    def forward_and_backward(n, chunk):
        hidden, targets = torch.randn(n, D, requires_grad=True), torch.randint(0, V, (n,))

        def run():
            setting = (1.0, 0.33, None, chunk, entropies)
            logp, hc, *_ = aent.head_stats(hidden, targets, weight, None, *setting)
            (logp.sum() + hc.sum()).backward()  # as the bonus does; hc is zeros without entropies

        return peak_rss_mib_of(run)

    forward_and_backward(256, 128)  # warm-up: allocator and autograd caches
    small, large = forward_and_backward(256, 128), forward_and_backward(4096, 128)
    whole = forward_and_backward(4096, 4096)  # one chunk: all [4096, V] logits alive at once
    one_fp32_logits = 4096 * V * 4 / 2**20  # 156 MiB
    assert large < small + 0.1 * one_fp32_logits, (small, large)
    assert whole > one_fp32_logits > 2 * large, (whole, large)


def test_policy_update_trims_each_micro_batch_and_keeps_the_exact_token_mean_gradient(
    tiny, monkeypatch
):
    """Micro-batches of rows sorted by length, each cut to its own width, give the update that
    one pass over the whole untrimmed batch gives (SGD, lr 1: the weights are the gradient)."""
    import copy

    _, tokenizer = tiny
    G, T = 2, 12
    prompts = ["Repeat 3", "Question: a much longer prompt than the others\nAnswer:", "Q", "Hi"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc.input_ids.repeat_interleave(G, 0)  # [8, P] left-padded
    prompt_attn = enc.attention_mask.repeat_interleave(G, 0)
    gen = torch.Generator().manual_seed(5)
    completion = torch.randint(3, 99, (8, T), generator=gen)
    for row, end in enumerate([2, 11, 5, 0, 7, 3, 1, 9]):  # EOS (id 0) placed by hand
        completion[row, end] = 0
    completion[3] = torch.randint(3, 99, (T,), generator=gen)  # one cut at the limit: no EOS
    mask = aent.completion_mask(completion, [0])  # [8, T]
    roll = dict(input_ids=torch.cat([prompt_ids, completion], 1),
                attention_mask=torch.cat([prompt_attn, mask], 1), mask=mask)  # fmt: skip
    adv = torch.randn(8, generator=gen)
    flags = ["--model", "tiny", "--group-size", "2", "--prompts-per-step", "4",
             "--mini-batch-prompts", "4", "--micro-batch-size", "3",
             "--max-grad-norm", "1e9"]  # fmt: skip
    args = aent.parse_args(flags)

    start = build_tiny(seed=0)[0]
    reference = copy.deepcopy(start).train()
    logp, h_clamped, *_ = aent.token_stats(
        reference, roll["input_ids"], roll["attention_mask"], mask, 1.0, 0.33, None, 64
    )
    loss, _ = aent.aent_loss(logp, logp.detach(), adv, mask, h_clamped, coef=0.01)
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=1.0).step()

    widths, real = [], aent.token_stats
    record = lambda m, ids, *a: widths.append(ids.size(1)) or real(m, ids, *a)  # noqa: E731
    monkeypatch.setattr(aent, "token_stats", record)
    trimmed = copy.deepcopy(start)
    aent.policy_update(
        trimmed, torch.optim.SGD(trimmed.parameters(), lr=1.0), roll, mask, adv, 0.01, args
    )
    assert len(widths) == 3 and min(widths) < roll["input_ids"].size(1) // 2  # cut to its own
    for (name, got), want in zip(trimmed.named_parameters(), reference.parameters()):
        assert not torch.equal(got, start.state_dict()[name])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_training_step_calls_clamped_entropy(tmp_path, monkeypatch):
    calls, real = [], aent.clamped_entropy

    def counted(logits, drop_frac=0.0, top_k=None):
        calls.append((tuple(logits.shape), drop_frac, top_k, torch.is_grad_enabled()))
        return real(logits, drop_frac, top_k)

    monkeypatch.setattr(aent, "clamped_entropy", counted)
    args = aent.parse_args(["--model", "tiny", "--steps", "1", "--out-dir", str(tmp_path / "run")])
    aent.train(args)
    kept = 99 - int(args.drop_frac * 99)  # the kept set A_k of the tiny vocabulary
    bonus = [c for c in calls if c[0][-1] == kept and c[3]]  # H~ of A_k's logits, with gradient
    assert bonus and all(c[1] == 0.0 and c[2] is None for c in bonus)  # nothing more dropped


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
    before = build_tiny(seed=0)[0].state_dict()
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
    before = build_tiny(seed=0)[0].state_dict()
    model = aent.train(args)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(m["truncated_frac"] == 1.0 for m in lines)  # one new token, never an EOS here
    assert (
        all(m["entropy_clamped"] is None for m in lines)  # no token: nothing to average
        and [m["entropy_coef"] for m in lines] == [args.entropy_coef] * 2
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "8"]], ids=["full", "lora"])
def test_the_gpu_precision_path_runs_on_the_cpu_under_bf16_autocast(tmp_path, monkeypatch, lora):
    """A GPU runs the passes under bf16 autocast (fp32 weights; with LoRA, a bf16 base and fp32
    adapters): forced on here, so that a dtype mistake on that path fails on a CPU too."""
    from support import models

    monkeypatch.setattr(models, "autocast", lambda device: torch.autocast("cpu", torch.bfloat16))
    monkeypatch.setattr(models, "frozen_dtype", lambda device: torch.bfloat16)
    out = tmp_path / "run"
    model = aent.train(aent.parse_args(["--model", "tiny", "--steps", "2", "--out-dir", str(out),
                                        "--beta", "0.01", "--prompts-per-step", "4",
                                        "--mini-batch-prompts", "2", *lora]))  # fmt: skip
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for key in ("reward", "loss", "entropy_clamped", "entropy_full", "dropped_mass", "kl_ref"):
        assert all(math.isfinite(m[key]) for m in lines), key
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad else torch.bfloat16  # trained: fp32 master weights
        assert p.dtype == want and torch.isfinite(p).all(), name
    if lora:  # B starts at 0
        assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    else:
        start = build_tiny(seed=0)[0].state_dict()
        assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
