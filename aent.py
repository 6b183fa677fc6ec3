"""AEnt: GRPO with an adaptive clamped-entropy bonus, in one file.

"On Entropy Control in LLM-RL Algorithms" (ICLR 2026, arXiv 2509.03493). One training step,
each line a function of this file, in the order it reads:

  1. rollout              sample G completions for each of N prompts with HF `generate`
  2. grade                r_i = 1 if completion i's final answer equals the gold one, else 0
  3. group_advantages     A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
  4. clamped_entropy      H~(s) = entropy of softmax(logits / temperature) renormalised over the
                          kept set A_k: the lowest-logit fraction p of the vocabulary is dropped
  5. aent_loss            L = L_PPO-clip(ratio, A) - lambda * mean_t H~(s_t), token-means
                          (policy_loss is the PPO term alone)
  6. update_entropy_coef  lambda <- clip(lambda - eta * (min(0, H~ - H_low) + max(0, H~ - H_high)),
                                     lambda_min, lambda_max), once per step

`--entropy none` is plain GRPO; `--entropy full` the conventional bonus on the full-vocabulary
entropy H; `--entropy clamped` (the default) with `--adaptive-coef` is AEnt. Symbols: lambda is
the entropy coefficient, eta its step size (--coef-lr), beta the weight of an optional KL penalty.
The support/ package holds what a run needs besides the method (flags, data, checkpoints, ...).

    python aent.py --model Qwen/Qwen2.5-Math-1.5B      # the paper's recipe, scaled to one GPU
    torchrun --nproc_per_node 8 aent.py --model Qwen/Qwen2.5-7B --fsdp --rollout-batch-size 32
    python aent.py --model tiny                        # offline CPU demo on a toy task
    python aent.py --lora-rank 32 --rollout-batch-size 64   # LoRA: the 1.5B model on 24 GB
"""

import contextlib
import signal
import time

if __name__ == "__main__":  # Ctrl-C while the libraries import: exit quietly, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from grader import grade
from support import checkpoints, cli, data, models, rundir
from support import distributed as dist
from support.signals import StopRequest


# Arguments ----------------------------------------------------------------------------------------
def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Args:
    # model and data
    recipe: Optional[str] = arg(None, "published settings for flags not given", choices=cli.RECIPES)
    model: str = arg("Qwen/Qwen2.5-Math-1.5B", "hub id, local directory, or 'tiny' (CPU demo)")
    dataset: str = arg("math", "gsm8k, math, math500, toy, or a local .jsonl/.parquet file")
    split: str = arg("train", "split of a hub dataset")
    prompt: str = arg("qwen-math", "prompt style (see build_prompt)", choices=cli.PROMPTS)
    out_dir: str = arg("runs/aent", "where metrics.jsonl, samples.jsonl and checkpoints go")
    seed: int = arg(0, "seed of the data order, the sampling and the tiny model's weights")
    # rollout
    steps: int = arg(500, "training steps: one rollout and one coefficient update each")
    prompts_per_step: int = arg(32, "prompts N per step (the recipe: 512 on 4 GPUs)")
    group_size: int = arg(16, "completions G sampled per prompt")
    max_prompt_tokens: int = arg(1024, "longest prompt in tokens (see --long-prompts)")
    max_new_tokens: int = arg(3072, "completion length limit")
    temperature: float = arg(1.0, "sampling temperature T; log-probs and entropies use it too")
    top_p: float = arg(1.0, "nucleus sampling threshold (1: off)")
    rollout_batch_size: int = arg(128, "sequences per generate call")
    # policy update
    mini_batch_prompts: int = arg(8, "prompts per optimizer update")
    ppo_epochs: int = arg(1, "passes over each step's rollouts")
    micro_batch_size: int = arg(8, "sequences per forward/backward (gradient accumulation)")
    lr: float = arg(2e-6, "AdamW learning rate (constant; with LoRA, 10x this when not given)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    lora_rank: int = arg(0, "LoRA rank r: train adapters on every linear layer (0: all weights)")
    lora_alpha: float = arg(32.0, "LoRA scale alpha: W x + (alpha / r) B A x (the lr assumes 32)")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping threshold")
    clip_low: float = arg(0.2, "PPO clip: the ratio is clipped below at 1 - clip_low")
    clip_high: float = arg(0.2, "PPO clip: the ratio is clipped above at 1 + clip_high")
    dual_clip: float = arg(3.0, "dual clip c: the loss of a negative advantage is at most -c A")
    scale_adv: bool = arg(True, "divide advantages by the group std (no: only centre them)")
    beta: float = arg(0.0, "weight beta of a KL penalty to the initial model (0: none loaded)")
    mask_truncated: bool = arg(False, "leave completions cut at max_new_tokens out of the loss")
    # entropy bonus
    entropy: str = arg("clamped", "the bonus: none (GRPO), full (-lambda H, the whole vocabulary) "
                       "or clamped (-lambda H~, AEnt)", choices=cli.BONUSES)  # fmt: skip
    drop_frac: float = arg(0.33, "kept set of H~: drop the fraction p of lowest logits")
    keep_top_k: Optional[int] = arg(None, "kept set of H~: keep the k highest logits instead")
    entropy_coef: float = arg(0.002, "initial entropy coefficient lambda_0")
    adaptive_coef: bool = arg(True, "adapt lambda to keep the bonus's entropy (H~, or H with "
                              "--entropy full) in [h_low, h_high] (no: fixed lambda)")  # fmt: skip
    h_low: float = arg(0.15, "lower edge H_low of the target band of the bonus entropy")
    h_high: float = arg(0.24, "upper edge H_high of the target band")
    coef_lr: float = arg(0.002, "step size eta of the coefficient update")
    coef_min: float = arg(0.0006, "lower bound lambda_min of the coefficient")
    coef_max: float = arg(0.009, "upper bound lambda_max of the coefficient")
    coef_warmup: int = arg(30, "steps during which lambda stays at lambda_0")
    # engineering
    logits_chunk: int = arg(1024, "completion tokens per chunk of fp32 logits")
    grad_checkpointing: bool = arg(True, "recompute layer activations in the backward pass")
    save_every: int = arg(50, "steps between resumable checkpoints (0: only at the end)")
    keep_last: int = arg(2, "step checkpoints kept on disk (final/ is always kept)")
    max_bad_updates: int = arg(3, "stop after this many non-finite updates in a row")
    long_prompts: str = arg("skip", "prompts over --max-prompt-tokens: skip or error")
    sample_every: int = arg(10, "steps between stored samples, plus the first and last (0: none)")
    eval_every: int = arg(0, "steps between greedy scoring of held-out problems (0: never)")
    eval_size: int = arg(64, "problems held out of the training data for --eval-every")
    report_to: str = arg("none", "live dashboard: none, tensorboard (OUT/tensorboard) or wandb",
                         choices=cli.REPORTS)  # fmt: skip
    fsdp: bool = arg(False, "under torchrun, shard weights, gradients and AdamW over the ranks")


def parse_args(argv=None) -> Args:
    """Args from the command line. Flags not given take the CPU demo's values with --model tiny,
    a published recipe's with --recipe; with LoRA the lr is 10x (support/cli.py says why)."""
    return cli.parse_args(Args, argv, __doc__)


# Data and prompt ----------------------------------------------------------------------------------
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
VERL_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def build_prompt(tokenizer, question: str, style: str = "qwen-math") -> str:
    """The chat-template prompt of a model family. 'qwen-math': the boxed-answer system prompt
    (Qwen2.5-Math's harness); 'verl': the AEnt recipe's instruction after the question, the
    template's default system prompt; 'r1': no system prompt, SYSTEM_PROMPT at the end of the
    user turn (DeepSeek's advice for R1 models, whose template then opens a <think> block)."""
    if not tokenizer.chat_template:  # a model without a template (the tiny demo)
        return f"Question: {question}\nAnswer:"
    suffix = {"verl": VERL_SUFFIX, "r1": "\n" + SYSTEM_PROMPT}.get(style, "")
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if style == "qwen-math" else []
    messages = system + [{"role": "user", "content": question + suffix}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# Step 1: rollout ---------------------------------------------------------------------------------
def completion_mask(completion_ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after: by position, never by pad id (pad may be EOS).

    [[5, 9, EOS, EOS, EOS]] -> [[1, 1, 1, 0, 0]]; a row without EOS (truncated) is all ones.
    """
    eos = torch.as_tensor(list(eos_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()  # [B, T]
    return (is_eos.cumsum(-1) - is_eos == 0).long()  # [B, T] no EOS strictly before t


def generation_config(tokenizer, eos_ids, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0):
    """Every sampling field explicit, so that the checkpoint's generation_config changes none of
    them. temperature 0 is greedy decoding; top_k 0 is no top-k cut."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(
        do_sample=sample, temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0, top_k=top_k if sample else None,
        max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], gen, group_size=1, batch_size=128) -> dict:
    """Sample group_size completions per prompt with `generate`; a group is contiguous rows.

    Returns input_ids [B, P+T] (prompt left-padded, completion right-padded), attention_mask
    [B, P+T], mask [B, T] over completion tokens, truncated [B] (no EOS), and the decoded
    completions; B = len(prompts) * group_size. `gen` comes from `generation_config`.
    """
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0).to(device)  # [B, P]
    prompt_attn = enc.attention_mask.repeat_interleave(group_size, 0).to(device)  # [B, P]
    # generate fills unset fields (repetition_penalty, ...) from the model's generation_config:
    # swap ours in (with LoRA, in the model peft wraps: peft's generate reads that one)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, was_training, inner.generation_config = inner.generation_config, model.training, gen
    model.eval()  # gradient checkpointing acts in train mode only: generate keeps its KV cache
    chunks = []
    try:
        for i in range(0, len(prompt_ids), batch_size):
            ids, attn = prompt_ids[i : i + batch_size], prompt_attn[i : i + batch_size]
            with models.autocast(device):  # bf16 on a GPU
                out = model.generate(
                    input_ids=ids, attention_mask=attn, generation_config=gen, synced_gpus=False
                )  # no lockstep between ranks: with FSDP, call it inside dist.gathered
            chunks.append(out[:, prompt_ids.size(1) :])  # [b, T_i]
    finally:
        inner.generation_config = saved
        model.train(was_training)
    T, pad = max(c.size(1) for c in chunks), tokenizer.pad_token_id
    completion_ids = torch.cat([F.pad(c, (0, T - c.size(1)), value=pad) for c in chunks])  # [B, T]
    mask = completion_mask(completion_ids, gen.eos_token_id)  # [B, T]
    eos = torch.tensor(gen.eos_token_id, device=device)
    kept = completion_ids.masked_fill(mask == 0, pad)  # [B, T] nothing after the first EOS
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),  # [B, P+T]
        "attention_mask": torch.cat([prompt_attn, mask], 1),  # [B, P+T]
        "mask": mask,  # [B, T]
        "truncated": ~torch.isin(completion_ids, eos).any(1),  # [B] no EOS: cut at the limit
        "completions": tokenizer.batch_decode(kept, skip_special_tokens=True),
    }


# Step 2: reward, `grade` from grader.py (math-verify does the mathematics) -----------------------
# Step 3: group advantages ------------------------------------------------------------------------
def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-6):
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), groups of group_size contiguous rewards.

    rewards [1, 0, 0, 0] with G = 4 -> [1.5, -0.5, -0.5, -0.5]; a group of equal rewards -> zeros.
    """
    r = rewards.view(-1, group_size)  # [N, G]
    adv = r - r.mean(-1, keepdim=True)  # [N, G]
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # Bessel-corrected std
    return adv.view(-1)  # [N*G]


# Step 4: clamped entropy, with the per-token log-probs --------------------------------------------
def kept_logits(logits: torch.Tensor, drop_frac: float = 0.0, top_k: Optional[int] = None):
    """The logits of the kept set A_k: the top_k highest or, with top_k=None, all but the
    int(drop_frac * V) lowest. logits [..., V] -> [..., k], in no particular order. The choice
    is discrete: gradient reaches only the kept logits, so dropped tokens are never pushed up."""
    V = logits.size(-1)
    k = V - int(drop_frac * V) if top_k is None else min(top_k, V)
    if k < 1:
        raise ValueError(f"no token kept: V={V}, drop_frac={drop_frac}, top_k={top_k}")
    return logits if k == V else logits.topk(k, dim=-1, sorted=False).values  # [..., k]


def clamped_entropy(logits: torch.Tensor, drop_frac: float = 0.0, top_k: Optional[int] = None):
    """H~(s) = -sum_{a in A_k} pi~(a) log pi~(a),  pi~(a) = pi(a) / sum_{a' in A_k} pi(a').

    The entropy of the softmax over the kept logits (kept_logits). logits [..., V], already
    divided by the temperature -> entropy [...]; drop_frac=0 is the ordinary entropy H.
    Logits [2, 1, -9] with drop_frac 0.34 -> the entropy of softmax([2, 1]) = 0.582.
    """
    logp = kept_logits(logits, drop_frac, top_k).float().log_softmax(-1)  # [..., k]
    return -(logp.exp() * logp).sum(-1)  # [...]


def head_stats(hidden, targets, weight, bias, temperature, drop_frac, top_k, chunk, entropies=True):
    """log pi(y), H~, H and the mass the clamp drops, 1 - pi(A_k), from fp32 logits / temperature.

    hidden [N, D] (the states that predict the tokens), targets [N] -> four [N] tensors. log pi(y)
    and H~ carry gradient, H and the dropped mass are values to log; entropies=False: log pi(y)
    alone (zeros for the rest). `chunk` tokens at a time under torch.utils.checkpoint: a chunk's
    [chunk, V] logits are freed after its forward and recomputed in the backward (flat memory).
    """

    def stats(h, y):  # h [C, D], y [C]
        with torch.autocast(h.device.type, enabled=False):  # fp32 also under bf16 autocast
            b = None if bias is None else bias.float()
            logits = F.linear(h.float(), weight.float(), b) / temperature  # [C, V]
        log_z = logits.logsumexp(-1)  # [C] log of the softmax's normaliser
        logp = logits.gather(-1, y[:, None]).squeeze(-1) - log_z  # [C]
        if not entropies:
            return logp, *torch.zeros_like(logp).expand(3, -1)
        kept = kept_logits(logits, drop_frac, top_k)  # [C, k]
        h_clamped = clamped_entropy(kept)  # H~: nothing more dropped from A_k
        with torch.no_grad():  # values, after H~: the backward's recomputation stops before them
            h_full, low = clamped_entropy(logits), kept.min(-1, keepdim=True).values  # [C, 1]
            p = (logits - log_z[:, None]).exp()  # [C, V] summed where dropped, not as 1 - kept:
            ties = (logits == low).sum(-1) - (kept == low).sum(-1)  # fp32 would lose 1e-6 masses
            dropped = (p * (logits < low)).sum(-1) + ties * (low[:, 0] - log_z).exp()  # [C]
        return logp, h_clamped, h_full, dropped

    chunks = zip(hidden.split(chunk), targets.split(chunk))
    parts = [checkpoint(stats, h, y, use_reentrant=False) for h, y in chunks]
    return [torch.cat(x) for x in zip(*parts)]  # 4 x [N]


def token_stats(model, input_ids, attention_mask, mask, temperature, drop_frac, top_k, chunk,
                entropies=True):  # fmt: skip
    """log pi(y_t), H~(s_t), H(s_t) and the mass dropped from s_t per completion token: four
    [B, T], 0 where mask is 0. The head runs at completion positions only, through `head_stats`."""
    T = mask.size(1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] as generate sets them
    kw = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    # [B, L, D] before the head, through the model's forward (FSDP gathers weights there): 1 logit
    hidden = model(input_ids, **kw, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    keep = mask.bool()  # [B, T]
    hidden = hidden[:, -T - 1 : -1][keep]  # [N, D] the states that predict completion tokens
    targets = input_ids[:, -T:][keep]  # [N]
    head = model.get_output_embeddings()
    stats = head_stats(hidden, targets, head.weight, head.bias, temperature, drop_frac, top_k,
                       chunk, entropies)  # fmt: skip
    zeros = torch.zeros(mask.shape, device=mask.device)  # [B, T]
    return tuple(zeros.masked_scatter(keep, x) for x in stats)  # 4 x [B, T]


# Step 5: the loss ---------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """L_PPO-clip with dual clip, token-mean over mask: the PPO term of `aent_loss`, no bonus.
    logp, old_logp, mask [B, T]; adv [B].

    r_t = exp(logp - old_logp);  l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)),
    and for A < 0, l_t = min(l_t, -c A). Returns (loss, stats): clip_frac, dual_clip_frac and
    approx_kl as 0-d tensors (reading them is left to the caller: on a GPU each read is a sync).
    """
    mask = mask.float()
    adv = adv[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    loss_unclipped = -adv * ratio  # [B, T]
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    loss = torch.maximum(loss_unclipped, loss_clipped)  # [B, T]
    loss_dual = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)  # [B, T]
    stats = {
        "clip_frac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
        "dual_clip_frac": masked_mean((loss_dual < loss).float(), mask),
        "approx_kl": masked_mean(old_logp - logp, mask).detach(),
    }
    return masked_mean(loss_dual, mask), stats


def aent_loss(logp, old_logp, adv, mask, entropy, coef, clip_low=0.2, clip_high=0.2,
              dual_clip=3.0, ref_logp=None, beta=0.0):  # fmt: skip
    """The whole loss of step 5: L = L_PPO-clip - lambda * mean_t H~(s_t) [+ beta * mean_t KL_t],
    each a token-mean over mask [B, T]. entropy [B, T] is the bonus's entropy per token (H~, or
    H for the conventional bonus), coef is lambda (0: no bonus, and no gradient through the
    entropy); ref_logp [B, T] a reference model's log-probs for the KL penalty (None: none),
    per token the k3 estimator exp(ref - logp) - (ref - logp) - 1 >= 0 of KL(pi || pi_ref).
    Returns (loss, stats): policy_loss's stats, and kl_ref with a reference."""
    loss, stats = policy_loss(
        logp, old_logp, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    if coef:
        loss = loss - coef * masked_mean(entropy, mask)
    if ref_logp is not None:
        d = ref_logp - logp  # [B, T]
        stats["kl_ref"] = masked_mean(torch.exp(d) - d - 1, mask)
        loss = loss + beta * stats["kl_ref"]
    return loss, stats


# Step 6: the coefficient update -------------------------------------------------------------------
def update_entropy_coef(coef, entropy, h_low, h_high, lr, coef_min, coef_max) -> float:
    """lambda <- clip(lambda - eta (min(0, H~ - H_low) + max(0, H~ - H_high)), lambda_min,
    lambda_max), eta = lr, H~ = entropy: below the band lambda rises, above it falls."""
    step = min(0.0, entropy - h_low) + max(0.0, entropy - h_high)
    return float(min(max(coef - lr * step, coef_min), coef_max))


# The training loop --------------------------------------------------------------------------------
UPDATE_STATS = ("loss", "clip_frac", "dual_clip_frac", "approx_kl", "kl_ref", "entropy_clamped",
                "entropy_full", "dropped_mass")  # fmt: skip
SHOWN = dict(reward="reward {:.3f}", entropy_clamped="H~ {:.3f}", entropy_full="H {:.3f}",
             entropy_coef="coef {:.4g}", clip_frac="clip {:.3f}", response_len="len {:.0f}",
             step_time="{:.1f}s", eval_accuracy="held-out accuracy {:.3f}")  # fmt: skip


def policy_update(model, opt, roll, mask, adv, coef, args: Args, ref_model=None):
    """PPO epochs over this rank's rollouts: minibatches of whole groups, micro-batches inside,
    each weighted by its share of the minibatch's tokens on all ranks (mask [B, T]), so the loss
    is a token-mean. A non-finite update is skipped. Returns token-means of the loss terms, and
    `applied`: for each optimizer update, whether it was taken."""
    G, (B, T) = args.group_size, mask.shape
    n_tokens = mask.sum(1).tolist()  # [B] on the host: no sync per micro-batch
    starts = roll["attention_mask"].argmax(1).tolist()  # [B] each prompt's first token

    # the bonus's kept set: --entropy full keeps every token (its H~ is H)
    drop_frac, top_k = (0.0, None) if args.entropy == "full" else (args.drop_frac, args.keep_top_k)

    def stats(net, rows, entropies=True):  # log pi, H~, H, dropped mass of the rows' tokens
        # on the rows' own width: from their earliest prompt token (prompts are left-padded) to
        # their longest completion (masks are prefixes), then padded back to [b, T]
        r = rows.tolist()
        first, t = min(starts[i] for i in r), max(1, *(n_tokens[i] for i in r))
        cols = slice(first, roll["input_ids"].size(1) - T + t)
        ids, attn = roll["input_ids"][rows, cols], roll["attention_mask"][rows, cols]
        with models.autocast(adv.device):
            out = token_stats(net, ids, attn, mask[rows, :t], args.temperature, drop_frac, top_k,
                              args.logits_chunk, entropies)  # fmt: skip
        return [F.pad(x, (0, T - t)) for x in out]  # 4 x [b, T]

    # With one update per step the policy is still the rollout policy when the loss is taken,
    # so the old log-probs are the update's own, detached; otherwise they are scored first.
    on_policy = args.ppo_epochs == 1 and args.mini_batch_prompts == args.prompts_per_step
    mb_rows = args.mini_batch_prompts * B // args.prompts_per_step  # this rank's share (of all B)
    micro = torch.arange(B).split(args.micro_batch_size)
    model.eval()
    with torch.no_grad():
        old_logp = None if on_policy else torch.cat([stats(model, r, False)[0] for r in micro])
        ref_logp = None
        if args.beta:  # the reference: ref_model (the initial model), or with LoRA the base
            with model.disable_adapter() if ref_model is None else contextlib.nullcontext():
                ref_logp = torch.cat([stats(ref_model or model, r, False)[0] for r in micro])
            dist.reshard(ref_model)  # with --fsdp: free the head it gathered, until next step
    model.train()

    clip = dict(clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip)
    logged, applied = [], []  # logged: (tokens, stats) per micro-batch
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B // G)  # shuffle groups, keep each group whole
        rows_by_group = (order[:, None] * G + torch.arange(G)).view(-1)  # [B]
        for mb in rows_by_group.split(mb_rows):
            mb = mb[torch.tensor([n_tokens[i] for i in mb]).argsort(descending=True)]  # by length
            mb_tokens = dist.all_sum(sum(n_tokens[i] for i in mb.tolist())).item()  # all ranks
            if mb_tokens == 0:  # every completion masked out (--mask-truncated): nothing to learn
                continue
            finite = True
            for rows in mb.split(args.micro_batch_size):  # every one, on all ranks (FSDP)
                m, n = mask[rows], sum(n_tokens[i] for i in rows.tolist())  # m [b, T]
                logp, h_clamped, h_full, dropped = stats(model, rows)  # [b, T] each
                old = logp.detach() if on_policy else old_logp[rows]  # [b, T]
                ref = None if ref_logp is None else ref_logp[rows]  # [b, T]
                loss, st = aent_loss(logp, old, adv[rows], m, h_clamped, coef, ref_logp=ref,
                                     beta=args.beta, **clip)  # fmt: skip
                (loss * (n / mb_tokens)).backward()  # the micro-batch's share of the token-mean
                finite = finite & torch.isfinite(loss)  # a tensor: no sync here
                st.update(loss=loss, entropy_full=masked_mean(h_full, m))
                if args.entropy != "full":  # nothing is clamped there
                    st.update(entropy_clamped=masked_mean(h_clamped, m))
                st.update(dropped_mass=masked_mean(dropped, m))
                logged.append((n, st))
            dist.sum_gradients(model)  # over ranks: the whole minibatch's token-mean
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            ok = bool(dist.all_sum(~(finite & torch.isfinite(dist.full(norm)))) == 0)  # all ranks
            if ok:
                opt.step()
            applied.append(ok)
            opt.zero_grad(set_to_none=True)
    out = {}
    for k in UPDATE_STATS:  # token-means over the step and every rank (None if never logged)
        tokens = dist.all_sum(sum(n for n, s in logged if k in s)).item()
        weighted = dist.all_sum(sum(n * s[k].detach() for n, s in logged if k in s))
        out[k] = (weighted / tokens).item() if tokens else None
    return {**out, "applied": applied}


def train(args: Args, stop: Optional[StopRequest] = None):
    """Train, or resume the run in args.out_dir. Returns the model (None if nothing was left)."""
    cli.check_args(args)
    stop = stop or StopRequest()
    rank, world, device = dist.init_distributed()  # (0, 1, cuda or cpu) without torchrun
    settings, defaults = asdict(args), {f.name: f.default for f in fields(Args)}
    rundir.claim(args.out_dir, settings, defaults)  # locked, and holding this run or none
    resume, state = checkpoints.resume_point(args.out_dir)  # its newest intact checkpoint, if any
    if state and state["step"] >= args.steps:
        print(f"nothing to do: {resume} already holds step {state['step']} of {args.steps}")
        return None
    problems = data.load_problems(args.dataset, args.split)  # data errors before the model loads
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    model, tokenizer = models.load_policy(args.model, device, args.seed, **lora, resume=resume)
    context = getattr(model.config, "max_position_embeddings", None)
    prompts = [build_prompt(tokenizer, p["question"], args.prompt) for p in problems]
    pairs, held_out = data.training_pairs(  # (prompt, gold): those that fit, and held-out ones
        prompts, [p["gold"] for p in problems], tokenizer, context, args.max_prompt_tokens,
        args.max_new_tokens, args.long_prompts, args.eval_size if args.eval_every else 0, args.seed,
    )  # fmt: skip
    eos = models.stop_token_ids(model, tokenizer)  # EOS, and Qwen's <|im_end|>, <|endoftext|>
    sampling = generation_config(tokenizer, eos, args.max_new_tokens, args.temperature, args.top_p)
    greedy = generation_config(tokenizer, eos, args.max_new_tokens, temperature=0)
    initial = args.beta and not args.lora_rank  # LoRA's reference is its base: nothing to load
    ref_model = models.load_model(args.model, device, args.seed)[0].eval() if initial else None
    if args.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if args.fsdp:  # each rank holds 1/N of the weights, and of their gradients and AdamW moments
        model, ref_model = dist.shard(model), (dist.shard(ref_model) if ref_model else None)
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    start, coef, bad_streak = 0, (0.0 if args.entropy == "none" else args.entropy_coef), 0
    if state:  # the weights came with the model; the optimizer and counters from here
        start, coef, bad_streak = checkpoints.restore(resume, state, model, opt)  # and says so
    rundir.start_logs(args.out_dir, settings, start, args.report_to)  # logs cut back to `start`
    print(f"model {args.model} on {device} | {len(pairs)} problems | bonus: {args.entropy}")

    G, adaptive = args.group_size, args.entropy != "none" and args.adaptive_coef
    bonus_entropy = "entropy_full" if args.entropy == "full" else "entropy_clamped"  # the band's
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=None)
    for step in bar:
        t0 = time.time()
        torch.manual_seed(data.step_seed(args.seed, step, rank))  # a function of the step
        # rollout, reward and group advantages of this rank's share of the step's prompts
        idx = data.step_batch(len(pairs), args.prompts_per_step, step, args.seed)[rank::world]
        prompts, golds = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx for _ in range(G)]
        with dist.gathered(model):  # with --fsdp, the full weights for generate, freed after
            roll = rollout(model, tokenizer, prompts, sampling, G, args.rollout_batch_size)
        rewards = torch.tensor([grade(c, g) for c, g in zip(roll["completions"], golds)])  # [B]
        adv = group_advantages(rewards, G, scale=args.scale_adv).to(device)  # [B]
        mask = roll["mask"] * ~roll["truncated"][:, None] if args.mask_truncated else roll["mask"]
        t_rollout = time.time() - t0

        # policy update with the entropy bonus; the coefficient's update follows the metrics
        upd = policy_update(model, opt, roll, mask, adv, coef, args, ref_model)
        bad_streak = checkpoints.stop_if_diverged(
            upd["applied"], bad_streak, args.max_bad_updates, args.out_dir
        )  # --max-bad-updates non-finite: stop
        if upd["loss"] is None:  # no token to learn from: say so, the metrics are null
            tqdm.write(f"step {step + 1}: every completion was cut at --max-new-tokens and masked")

        seen = torch.stack([rewards, roll["mask"].sum(1).cpu(), roll["truncated"].cpu()], 1)
        all_rewards, lengths, truncated = dist.gather(seen.float()).T  # every rank's [B]
        groups = all_rewards.view(-1, G)  # [N, G]
        m = {
            "step": step + 1,
            "reward": all_rewards.mean().item(),
            "entropy_coef": coef,  # the lambda this step's update used
            **{k: upd[k] for k in UPDATE_STATS},  # token-means over the update
            "skipped_updates": upd["applied"].count(False),
            "response_len": lengths.mean().item(),
            "truncated_frac": truncated.mean().item(),
            "zero_var_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
            "rollout_time": t_rollout,
            "step_time": time.time() - t0,
        }
        if adaptive and step + 1 >= args.coef_warmup and any(upd["applied"]):
            coef = update_entropy_coef(coef, upd[bonus_entropy], h_low=args.h_low,
                                       h_high=args.h_high, lr=args.coef_lr,
                                       coef_min=args.coef_min, coef_max=args.coef_max)  # fmt: skip
        if held_out and (step + 1) % args.eval_every == 0:
            with dist.gathered(model):  # every rank gathers (--fsdp); rank 0 scores, greedily
                if rank == 0:
                    questions, answers = zip(*held_out)
                    texts = rollout(model, tokenizer, questions, greedy, 1,
                                    args.rollout_batch_size)["completions"]  # fmt: skip
                    m["eval_accuracy"] = sum(map(grade, texts, answers)) / len(answers)
        rundir.log_step(args.out_dir, m, SHOWN, tqdm.write)  # metrics.jsonl and a printed line
        if rundir.sample_due(step + 1, args.sample_every, args.steps):  # 3 to samples.jsonl
            rundir.log_samples(args.out_dir, step + 1, prompts, roll["completions"], golds,
                               rewards, G, tqdm.write)  # fmt: skip

        done = step + 1 == args.steps
        stopping = dist.all_sum(bool(stop.requested)) > 0  # every rank stops at one step
        if done or stopping or (args.save_every and (step + 1) % args.save_every == 0):
            state = {"step": step + 1, "coef": coef, "bad_streak": bad_streak}
            path = checkpoints.save_checkpoint(args.out_dir, model, tokenizer, opt, state,
                                               args.keep_last, final=done)  # fmt: skip
            if stopping and not done:
                bar.close()
                print(f"stopped by {stop.requested}: {path} holds step {step + 1}; rerun to resume")
                return model
    print(f"done: {args.steps} steps, final model in {path}")
    return model


def main(argv=None):
    args = parse_args(argv)
    with StopRequest(args.out_dir) as stop:  # SIGINT/TERM/HUP: finish the step and save
        train(args, stop)


if __name__ == "__main__":
    main()
