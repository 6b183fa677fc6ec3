"""AEnt: GRPO with an adaptive clamped-entropy bonus, in one file.

"On Entropy Control in LLM-RL Algorithms" (ICLR 2026, arXiv 2509.03493). One training step:

  1. rollout      sample G completions for each of N prompts with HF `generate`
  2. reward       grade each completion against the gold answer (math-verify): 1 or 0
  3. advantages   A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one per completion
  4. entropy      H~(s) = entropy of softmax(logits / T) renormalised over the kept tokens,
                  the lowest-logit fraction p of the vocabulary dropped ("clamped entropy")
  5. loss         L = L_PPO-clip(ratio, A) - lambda * mean_t H~(s_t)   (token-mean)
  6. coefficient  lambda <- clip(lambda - beta * (min(0, H~ - H_low) + max(0, H~ - H_high)),
                                 lambda_min, lambda_max)

`--entropy none` is plain GRPO, `--entropy full` the conventional full-vocabulary bonus,
`--entropy clamped` (the default) with `--adaptive-coef` is AEnt.

    python aent.py --model Qwen/Qwen2.5-Math-1.5B      # the paper's recipe, scaled to one GPU
    python aent.py --model tiny                         # offline CPU demo on a toy task
"""

import argparse
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------
def arg(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Args:
    # model and data
    model: str = arg("Qwen/Qwen2.5-Math-1.5B", "hub id, local directory, or 'tiny' (a small random Qwen2 for the offline CPU demo)")
    dataset: str = arg("math", "'gsm8k', 'math', 'math500', 'toy' (offline: repeat a digit), or a local .jsonl/.parquet file")
    split: str = arg("train", "dataset split to train on (hub datasets only)")
    out_dir: str = arg("runs/aent", "directory for metrics.jsonl, samples.jsonl and checkpoints")
    seed: int = arg(0, "random seed for data order, sampling and the tiny model's weights")
    # rollout
    steps: int = arg(500, "number of training steps (one rollout and one coefficient update each)")
    prompts_per_step: int = arg(32, "prompts per step (recipe: 512 on 4 GPUs)")
    group_size: int = arg(16, "completions sampled per prompt, G")
    max_prompt_tokens: int = arg(1024, "longest prompt in tokens; longer ones are skipped or an error (see --long-prompts)")
    max_new_tokens: int = arg(3072, "completion length limit; prompt + completion must fit the model's context")
    temperature: float = arg(1.0, "sampling temperature; log-probs and entropies are taken at the same temperature")
    top_p: float = arg(1.0, "nucleus sampling threshold (1.0 = off)")
    rollout_batch_size: int = arg(128, "sequences per `generate` call")
    # policy update
    mini_batch_prompts: int = arg(8, "prompts per optimizer step; prompts_per_step / mini_batch_prompts updates per step")
    ppo_epochs: int = arg(1, "passes over each step's rollouts")
    micro_batch_size: int = arg(8, "sequences per forward/backward (gradient accumulation inside a minibatch)")
    lr: float = arg(2e-6, "AdamW learning rate (constant)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping threshold")
    clip_low: float = arg(0.2, "PPO clip: ratio is clipped below at 1 - clip_low")
    clip_high: float = arg(0.2, "PPO clip: ratio is clipped above at 1 + clip_high")
    dual_clip: float = arg(3.0, "dual clip c: loss for negative advantages is capped at -c * A")
    scale_adv: bool = arg(True, "divide group advantages by the group std (GRPO); --no-scale-adv only centres them")
    beta: float = arg(0.0, "KL penalty weight to a frozen reference model (0: no reference model is loaded)")
    mask_truncated: bool = arg(False, "leave completions that hit max_new_tokens out of the loss")
    # entropy bonus
    entropy: str = arg("clamped", "entropy bonus: none (GRPO), full (whole vocabulary), clamped (AEnt)", choices=("none", "full", "clamped"))
    drop_frac: float = arg(0.33, "clamped entropy: fraction p of the vocabulary dropped, lowest logits first")
    top_k: Optional[int] = arg(None, "clamped entropy: keep this many highest logits (overrides --drop-frac)")
    entropy_coef: float = arg(0.002, "initial entropy coefficient lambda_0")
    adaptive_coef: bool = arg(True, "adapt lambda to keep the bonus entropy in [h_low, h_high]; --no-adaptive-coef keeps it fixed")
    h_low: float = arg(0.15, "lower edge of the target entropy band (on the bonus entropy's scale)")
    h_high: float = arg(0.24, "upper edge of the target entropy band")
    coef_lr: float = arg(0.002, "step size beta of the coefficient update")
    coef_min: float = arg(0.0006, "lower bound lambda_min of the coefficient")
    coef_max: float = arg(0.009, "upper bound lambda_max of the coefficient")
    coef_warmup: int = arg(30, "steps during which lambda stays at its initial value")
    # engineering
    logits_chunk: int = arg(1024, "completion tokens per chunk when computing log-probs and entropies in fp32")
    grad_checkpointing: bool = arg(True, "recompute activations in the backward pass (the training pass only, never in generate)")
    save_every: int = arg(50, "save a resumable checkpoint every this many steps (0: only at the end)")
    keep_last: int = arg(2, "step checkpoints kept on disk (older ones are deleted; final/ is always kept)")
    max_bad_updates: int = arg(3, "stop after this many optimizer updates in a row with a non-finite loss or gradient")
    long_prompts: str = arg("skip", "prompts over --max-prompt-tokens: skip them (with a count) or stop with an error", choices=("skip", "error"))
    sample_every: int = arg(10, "print and store a few sample completions every this many steps")
    eval_every: int = arg(0, "score the held-out problems every this many steps, greedy, as eval.py does (0: never)")
    eval_size: int = arg(64, "problems held out of the training data for --eval-every")


# The CPU demo: a task and sizes where a randomly initialised model learns within minutes.
# Applied when --model tiny, to every field not given on the command line.
TINY_DEMO = dict(
    dataset="toy", out_dir="runs/tiny", steps=150, prompts_per_step=16, group_size=16, max_prompt_tokens=64,
    max_new_tokens=2, mini_batch_prompts=8, micro_batch_size=128, lr=1e-3, weight_decay=0.0, entropy_coef=0.01,
    h_low=0.5, h_high=1.5, coef_lr=0.01, coef_min=0.001, coef_max=0.05, coef_warmup=5, save_every=0,
)


def parse_args(argv=None) -> Args:
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY_DEMO.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"With --model tiny, flags not given take the CPU demo's values: {demo}.")
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = int if f.type == Optional[int] else f.type  # typing objects compare by ==, not identity
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    demo = TINY_DEMO if given.get("model") == "tiny" else {}
    return Args(**{**demo, **given})


def check_args(args: Args):
    """Reject impossible configurations before any long work starts."""
    problems = []
    for name in ("steps", "keep_last", "max_bad_updates", "prompts_per_step", "mini_batch_prompts", "micro_batch_size", "rollout_batch_size", "logits_chunk", "max_new_tokens", "ppo_epochs"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_every < 0 or (args.eval_every and args.eval_size < 1):
        problems.append("--eval-every must be >= 0, and --eval-size >= 1 when it is set")
    if args.group_size < 2:
        problems.append("--group-size must be at least 2 (group advantages need a group)")
    if not 0.0 <= args.drop_frac < 1.0:
        problems.append("--drop-frac must be in [0, 1)")
    if args.top_k is not None and args.top_k < 1:
        problems.append("--top-k must be positive")
    if args.mini_batch_prompts >= 1 and args.prompts_per_step % args.mini_batch_prompts:
        problems.append("--prompts-per-step must be a multiple of --mini-batch-prompts")
    if args.temperature <= 0:
        problems.append("--temperature must be positive for sampling")
    if not 0 < args.top_p <= 1:
        problems.append("--top-p must be in (0, 1]")
    if args.entropy != "none" and args.adaptive_coef and not args.coef_min <= args.entropy_coef <= args.coef_max:
        problems.append("--entropy-coef must lie in [--coef-min, --coef-max]")
    if args.h_low > args.h_high:
        problems.append("--h-low must not exceed --h-high")
    if problems:
        sys.exit("error: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# 2. Data and prompt
# ----------------------------------------------------------------------------------------------
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
HUB_DATASETS = {  # name: (hub id, config); --split picks train or test
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", None),
    "math500": ("HuggingFaceH4/MATH-500", None),
}


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced: 'so \\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}'."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def problem_from_row(row: dict) -> Optional[dict]:
    """A dataset row -> {'question', 'gold'}, or None if it has no question or no gold answer.

    Gold is `answer` (GSM8K's '... #### 1,600' -> '1600'), else the last \\boxed{} of `solution`.
    """
    question = row.get("question") or row.get("problem")
    gold = row.get("answer")
    if gold is not None:
        gold = str(gold)
        if "####" in gold:
            gold = gold.split("####")[-1].strip().replace(",", "")
    elif row.get("solution"):
        gold = last_boxed(row["solution"])
    if not question or gold is None or not gold.strip():
        return None
    return {"question": str(question), "gold": gold.strip()}


def toy_problems() -> list[dict]:
    """The offline demo task, for a randomly initialised model: 'Repeat 7' -> '7', ten problems."""
    return [{"question": f"Repeat {d}", "gold": str(d)} for d in range(10)]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a .jsonl file; a bad line is a one-line error."""
    rows = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    row = json.loads(raw.decode("utf-8")) if raw.strip() else None
                except (ValueError, UnicodeDecodeError) as e:
                    sys.exit(f"error: {path} line {n}: not valid JSON ({str(e)[:80]})")
                if row is not None and not isinstance(row, dict):
                    sys.exit(f"error: {path} line {n}: not a JSON object")
                if row is not None:
                    rows.append((n, row))
    except OSError as e:
        sys.exit(f"error: cannot read {path}: {e.strerror}")
    return rows


def load_problems(dataset: str, split: str = "train") -> list[dict]:
    """Problems {'question', 'gold'[, 'level', 'subject']} from a hub dataset by name, a local
    .jsonl/.parquet file, or the toy task. A hub row without question or gold is skipped; in a
    local file it is an error that names the line."""
    if dataset == "toy":
        return toy_problems()
    import datasets

    datasets.disable_progress_bars()
    local = dataset.endswith((".jsonl", ".parquet"))
    if dataset in HUB_DATASETS:
        name, config = HUB_DATASETS[dataset]
        try:
            rows = list(enumerate(datasets.load_dataset(name, config, split=split), 1))
        except Exception as e:  # offline, unknown split, ...: the library raises many kinds
            sys.exit(f"error: cannot load {name} (split {split!r}) from the hub: {str(e).splitlines()[0]}")
    elif local and not os.path.isfile(dataset):
        sys.exit(f"error: dataset file {dataset} not found")
    elif dataset.endswith(".jsonl"):
        rows = read_jsonl(dataset)
    elif dataset.endswith(".parquet"):
        try:
            rows = list(enumerate(datasets.load_dataset("parquet", data_files=dataset, split="train"), 1))
        except Exception as e:
            sys.exit(f"error: cannot read {dataset} as parquet: {str(e).splitlines()[0]}")
    else:
        sys.exit(f"error: unknown dataset {dataset!r}: use {', '.join(HUB_DATASETS)}, toy, or a .jsonl/.parquet path")
    problems = []
    for n, row in rows:
        problem = problem_from_row(row)
        if problem is None and local:
            where = "line" if dataset.endswith(".jsonl") else "row"
            sys.exit(f"error: {dataset} {where} {n}: needs a question/problem and a gold answer (answer, or \\boxed{{}} in solution)")
        if problem is not None:
            level, subject = row.get("level"), row.get("subject") or row.get("type")
            if level is not None:
                problem["level"] = f"Level {level}" if isinstance(level, int) else str(level)
            if subject:
                problem["subject"] = str(subject)
            problems.append(problem)
    if not problems:
        sys.exit(f"error: {dataset} has no rows with a question/problem and an answer/solution field")
    return problems


def build_prompt(tokenizer, question: str) -> str:
    """The Qwen2.5-Math prompt: chat template with the boxed-answer system prompt; plain text otherwise."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------------------------
# 3. Reward
# ----------------------------------------------------------------------------------------------
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+/\d+|-?\d+(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the last \\boxed{...}, else the last number. 'so 3/4, i.e. 0.75' -> '0.75'.

    A completion whose last box is unclosed (cut off mid-answer) has no answer.
    """
    if "\\boxed{" in text or "\\fbox{" in text:
        return last_boxed(text)  # None if the last box is unclosed (a truncated answer)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


@functools.lru_cache(maxsize=65536)
def _parse(answer: str, timeout):
    from math_verify import parse

    return parse("\\boxed{" + answer + "}", parsing_timeout=timeout)


def grade(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is mathematically equivalent to gold (math-verify), else 0.0.

    Any failure to parse or verify, or a timeout (5 s, signal-based: main thread only), scores 0.
    """
    from math_verify import verify

    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return float(verify(_parse(gold, timeout), _parse(answer, timeout), timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input and on timeouts
        return 0.0


# ----------------------------------------------------------------------------------------------
# 4. Model
# ----------------------------------------------------------------------------------------------
def build_tiny(seed: int = 0):
    """A randomly initialised 2-layer Qwen2 with a 99-token character-level tokenizer, built offline.

    The tokenizer is a Qwen2Tokenizer (byte-level BPE without merges) whose vocabulary is the
    printable ASCII characters, so a saved checkpoint reloads through AutoTokenizer unchanged
    (transformers 5 rebuilds every qwen2 checkpoint's tokenizer as a Qwen2Tokenizer).
    Characters outside that set are dropped.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    byte_level = [{" ": "\u0120", "\n": "\u010a"}.get(c, c) for c in chars]  # GPT-2 byte-to-unicode names of space, newline
    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(specials + byte_level)}, merges=[], extra_special_tokens=specials[1:])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer


def load_model(name: str, device: torch.device, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer) from the hub, a local directory, or 'tiny'. Training keeps fp32 weights:
    on GPU the passes run under bf16 autocast, because bf16 weights would round away 1e-6-sized
    updates. Evaluation may load bf16 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        model, tokenizer = build_tiny(seed)
    else:
        if os.path.isdir(name) and not any(
            os.path.exists(os.path.join(name, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            sys.exit(f"error: {name} has no tokenizer (tokenizer.json / tokenizer_config.json); save the tokenizer beside the model")
        if name.startswith((".", "/", "~")) and not os.path.isdir(name):
            sys.exit(f"error: model directory {name} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot load model {name!r} (not a local directory, or not reachable on the hub): {str(e).splitlines()[0]}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype), tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's and the checkpoint's EOS, plus Qwen's
    <|im_end|> and <|endoftext|> (base models stop on the latter, the chat template on the former)."""
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    for token in ("<|im_end|>", "<|endoftext|>"):
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# 5. Rollout
# ----------------------------------------------------------------------------------------------
def completion_mask(completion_ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it. By position, never by pad id (pad may equal EOS).

    [[5, 9, EOS, EOS, EOS]] -> [[1, 1, 1, 0, 0]]; a row without EOS (truncated) is all ones.
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))  # [B, T]
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # [B, T] EOS count strictly before t
    return (eos_before == 0).long()


def generation_config(tokenizer, eos_ids, max_new_tokens, temperature=1.0, top_p=1.0):
    """What to sample, every field explicit so the checkpoint's generation_config changes none of
    them. temperature 0 is greedy decoding. `rollout` draws the tokens with `InverseCDFSampler`."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(
        do_sample=sample, temperature=temperature if sample else 1.0, top_p=top_p if sample else 1.0, top_k=0 if sample else None,
        max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


class InverseCDFSampler:
    """A logits processor that draws the next token from softmax(scores / T), restricted to the
    top_p nucleus, and leaves only that token's score finite, so generate's greedy step returns it.

    Why not generate's own sampler: torch.multinomial draws one exponential random number per
    vocabulary entry per row per step; at Qwen's 151,936 tokens that is three quarters of CPU
    decoding time. Inverse-CDF sampling draws one uniform number per row: the first token whose
    cumulative probability (float64) exceeds it. Same distribution, one pass over the vocabulary.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0):
        self.temperature, self.top_p = temperature, top_p
        self.cdf = None  # float64 [B, V], reused at every step of a generate call (fresh memory is slow on CPU)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature if self.temperature != 1.0 else scores.float()  # [B, V]
        if self.top_p < 1.0:  # keep the fewest highest-probability tokens whose mass reaches top_p
            sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
            probs = sorted_logits.softmax(-1)  # [B, V]
            outside = probs.cumsum(-1) - probs >= self.top_p  # [B, V] the mass before this token already reaches top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        if self.cdf is None or self.cdf.shape != logits.shape or self.cdf.device != logits.device:
            self.cdf = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
        cdf = self.cdf.copy_(logits).sub_(logits.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # [B, V] unnormalised
        if not torch.isfinite(cdf[:, -1]).all():
            raise ValueError("the model produced non-finite logits; cannot sample")
        u = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]  # [B, 1] uniform on [0, total)
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)  # [B, 1] first cdf > u
        return scores.fill_(float("-inf")).scatter_(-1, token, 0.0)  # [B, V] in place: generate's own fp32 copy


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], gen, group_size: int = 1, batch_size: int = 128) -> dict:
    """Sample group_size completions per prompt with `generate`; groups are contiguous rows.

    Returns input_ids [B, P+T] (prompt left-padded, completion right-padded), attention_mask
    [B, P+T], mask [B, T] over completion tokens, truncated [B], and the decoded completions
    (B = prompts * group_size). `gen` comes from `generation_config`.
    """
    from transformers import LogitsProcessorList

    eos_ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)  # [B, P]
    prompt_attn = enc.attention_mask.repeat_interleave(group_size, 0)  # [B, P]
    # generate fills every field left unset (repetition_penalty, min_new_tokens, ...) from
    # model.generation_config, so that is swapped for ours while sampling.
    # Sampling runs as a logits processor followed by greedy selection (see InverseCDFSampler).
    sampler = [InverseCDFSampler(gen.temperature, gen.top_p)] if gen.do_sample else []
    run = copy.deepcopy(gen)
    run.do_sample, run.temperature, run.top_p, run.top_k = False, None, None, None
    saved_config, was_training = model.generation_config, model.training
    model.generation_config = run
    model.eval()  # gradient checkpointing is only active in train mode, so the KV cache is used here
    chunks = []
    try:
        for i in range(0, len(prompt_ids), batch_size):
            with autocast(device):
                out = model.generate(
                    input_ids=prompt_ids[i : i + batch_size], attention_mask=prompt_attn[i : i + batch_size],
                    generation_config=run, logits_processor=LogitsProcessorList(sampler),
                )
            chunks.append(out[:, prompt_ids.size(1) :])  # [b, T_i]
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    T = max(c.size(1) for c in chunks)
    completion_ids = torch.cat([F.pad(c, (0, T - c.size(1)), value=tokenizer.pad_token_id) for c in chunks])  # [B, T]
    mask = completion_mask(completion_ids, eos_ids)  # [B, T]
    texts = tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),  # [B, P+T]
        "attention_mask": torch.cat([prompt_attn, mask], 1),  # [B, P+T]
        "mask": mask,  # [B, T]
        "truncated": ~torch.isin(completion_ids, torch.as_tensor(eos_ids, device=device)).any(1),  # [B]
        "completions": texts,
    }


def complete(model, tokenizer, prompts: list[str], gen, samples: int = 1, batch_size: int = 64, on_batch=None) -> list[list[str]]:
    """`samples` completions for every prompt, in prompt order. Prompts go longest first, so each
    `generate` call holds prompts of similar length; on_batch(n) reports progress."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    per_call = max(1, batch_size // samples)
    out = [None] * len(prompts)
    for j in range(0, len(order), per_call):
        idx = order[j : j + per_call]
        texts = rollout(model, tokenizer, [prompts[i] for i in idx], gen, samples, batch_size)["completions"]
        for k, i in enumerate(idx):
            out[i] = texts[k * samples : (k + 1) * samples]
        if on_batch:
            on_batch(len(idx))
    return out


# ----------------------------------------------------------------------------------------------
# 6. Group advantages
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), groups of group_size contiguous rewards.

    rewards [1, 0, 0, 0] with G = 4 -> [1.5, -0.5, -0.5, -0.5]; a group with equal rewards -> zeros.
    """
    r = rewards.view(-1, group_size)  # [N, G]
    adv = r - r.mean(-1, keepdim=True)  # [N, G]
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # Bessel-corrected std
    return adv.view(-1)  # [N*G]


# ----------------------------------------------------------------------------------------------
# 7. Clamped entropy
# ----------------------------------------------------------------------------------------------
def kept_count(V: int, drop_frac: float = 0.0, top_k: Optional[int] = None) -> int:
    """|A_k|: top_k, or V minus the int(drop_frac * V) lowest-logit tokens."""
    k = V - int(drop_frac * V) if top_k is None else min(top_k, V)
    if k < 1:
        raise ValueError(f"clamped entropy keeps no token (V={V}, drop_frac={drop_frac}, top_k={top_k})")
    return k


def clamped_entropy(logits: torch.Tensor, drop_frac: float = 0.0, top_k: Optional[int] = None) -> torch.Tensor:
    """H~(s) = -sum_{a in A_k} pi~(a) log pi~(a),  pi~(a) = pi(a) / sum_{a' in A_k} pi(a').

    A_k keeps the top_k highest logits, or (top_k=None) drops the int(drop_frac * V) lowest.
    logits [..., V], already divided by the temperature -> entropy [...]. drop_frac=0 is the
    ordinary entropy. The kept set is a discrete choice: gradient reaches only the kept logits.
    Logits [2, 1, -9], drop_frac 0.34 -> entropy of softmax([2, 1]) = 0.582.
    The plain definition, kept readable; training uses the equal but leaner `TokenStats`.
    """
    V = logits.size(-1)
    k = kept_count(V, drop_frac, top_k)
    kept = logits if k == V else logits.topk(k, dim=-1, sorted=False).values  # [..., k]
    logp = kept.float().log_softmax(-1)  # [..., k]
    return -(logp.exp() * logp).sum(-1)  # [...]


def kth_largest(z: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of z [C, V] -> [C, 1]. A selection (topk of whichever
    side is smaller, unsorted), not a sort of the vocabulary."""
    V = z.size(-1)
    if k <= V - k + 1:
        return z.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return z.topk(V - k + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)


def kept_weights(z: torch.Tensor, tau: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """A_k as weights [C, V], written into out: 1 where z >= tau (the k-th largest), else 0.

    Exactly k tokens are kept, as with topk: if more than k reach tau (ties at tau), the tied
    tokens share the places left, each with weight (k - #{z > tau}) / #{z == tau}. Tied tokens
    have equal logits, so the entropy is the one topk gives whichever of them it keeps. Ties are
    rare but real: among 151,936 fp32 logits, two equal values at tau happen every few hundred rows.
    """
    w = torch.ge(z, tau, out=out)  # [C, V] 0/1
    surplus = w.sum(-1) - k  # [C] > 0 only where tokens tie at tau
    for r in (surplus > 0).nonzero().flatten().tolist():
        tied = z[r] == tau[r]  # [V]
        w[r, tied] = 1 - surplus[r] / tied.sum()
    return w


def _logits(hidden, weight, bias, temperature, out):
    """fp32 logits / T written into out [C, V]."""
    h, w = hidden.float(), weight.float()
    torch.mm(h, w.t(), out=out) if bias is None else torch.addmm(bias.float(), h, w.t(), out=out)
    return out.div_(temperature) if temperature != 1.0 else out


def _rowdot(a, b):
    return torch.einsum("cv,cv->c", a, b)  # [C], without the [C, V] temporary of (a * b).sum(-1)


class TokenStats(torch.autograd.Function):
    """log pi(y), clamped entropy H~ and full entropy H for rows of hidden states, `chunk` rows at a time.

    The lean version of: logits = hidden @ W.T / T in fp32 (T: the sampling temperature), then
    log_softmax, gather and `clamped_entropy`, with the same numbers. No fp32 [N, V] tensor is ever
    alive: the forward keeps a few numbers per row (log Z, log Z over A_k, H~, tau) and the
    backward recomputes one chunk's logits at a time and applies the closed-form gradient
        d log pi(y) / dz_a = 1[a = y] - pi(a)
        d H~ / dz_a        = -pi~(a) (log pi~(a) + H~)  on A_k, 0 elsewhere  (pi~ = pi renormalised on A_k).
    Peak extra memory: three fp32 [chunk, V] buffers, reused by every chunk. Everything runs in
    fp32 with autocast off (under bf16 autocast, einsum and mm would round to bf16). H is for
    logging and carries no gradient. With entropy=False only log pi(y) is computed (entropies are 0).
    hidden [N, D], weight [V, D], bias [V] or None, targets [N] -> three [N] fp32 tensors.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, k, chunk, entropy=True):
        with torch.autocast(hidden.device.type, enabled=False):
            return TokenStats._forward(ctx, hidden, weight, bias, targets, temperature, k, chunk, entropy)

    @staticmethod
    def backward(ctx, g_logp, g_clamped, _):
        with torch.autocast(ctx.device_type, enabled=False):
            return TokenStats._backward(ctx, g_logp, g_clamped)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, temperature, k, chunk, entropy):
        N, V, dev = len(targets), weight.size(0), hidden.device
        logp, lse, lse_k, h_clamped, h_full = (torch.zeros(N, device=dev) for _ in range(5))  # [N] each
        tau = torch.full((N, 1), float("-inf"), device=dev)  # [N, 1]
        C = min(chunk, N)
        buf_z, buf_e = torch.empty(C, V, device=dev), torch.empty(C, V, device=dev)  # [C, V] each, reused
        buf_w = torch.empty(C, V, device=dev) if entropy and k < V else None
        for s in (slice(i, i + chunk) for i in range(0, N, chunk)):
            C = len(targets[s])
            z = _logits(hidden[s], weight, bias, temperature, buf_z[:C])  # [C, V]
            w = None
            if entropy and k < V:
                tau[s] = kth_largest(z, k)
                w = kept_weights(z, tau[s], k, buf_w[:C])  # [C, V]
            m = z.amax(-1)  # [C]
            zs = z.sub_(m[:, None])  # [C, V] z - max, in place
            e = torch.exp(zs, out=buf_e[:C])  # [C, V]
            total = e.sum(-1)  # [C]
            lse[s] = m + total.log()
            logp[s] = zs.gather(-1, targets[s, None]).squeeze(-1) - total.log()
            if entropy:
                h_full[s] = total.log() - _rowdot(e, zs) / total  # H = log Z - E[z]
                if w is not None:
                    total = e.mul_(w).sum(-1)  # [C] over A_k
                    lse_k[s], h_clamped[s] = m + total.log(), total.log() - _rowdot(e, zs) / total
                else:
                    lse_k[s], h_clamped[s] = lse[s], h_full[s]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, lse_k, h_clamped, tau)
        ctx.temperature, ctx.k, ctx.chunk, ctx.entropy, ctx.device_type = temperature, k, chunk, entropy, dev.type
        ctx.set_materialize_grads(False)  # unused outputs get None, so the backward can skip their terms
        ctx.mark_non_differentiable(h_full)
        if not entropy:
            ctx.mark_non_differentiable(h_clamped)
        return logp, h_clamped, h_full

    @staticmethod
    def _backward(ctx, g_logp, g_clamped):
        hidden, weight, bias, targets, lse, lse_k, h_clamped, tau = ctx.saved_tensors
        T, k, N, V = ctx.temperature, ctx.k, len(targets), weight.size(0)
        grad_h = torch.zeros(hidden.shape, device=hidden.device)  # [N, D] fp32
        grad_w = torch.zeros(weight.shape, device=weight.device)  # [V, D]
        grad_b = None if bias is None else torch.zeros(bias.shape, device=bias.device)  # [V]
        g_logp = (torch.zeros_like(lse) if g_logp is None else g_logp.float()) / T  # [N], 1/T from z = logits / T
        entropy_grad = ctx.entropy and g_clamped is not None
        g_clamped = g_clamped.float() / T if entropy_grad else None  # [N]
        C = min(ctx.chunk, N)
        buf_z, buf_p = torch.empty(C, V, device=hidden.device), torch.empty(C, V, device=hidden.device)  # [C, V] reused
        buf_w = torch.empty(C, V, device=hidden.device) if entropy_grad and k < V else None
        for s in (slice(i, i + ctx.chunk) for i in range(0, N, ctx.chunk)):
            C = len(targets[s])
            z = _logits(hidden[s], weight, bias, T, buf_z[:C])  # [C, V] recomputed
            pi = torch.sub(z, lse[s, None], out=buf_p[:C]).exp_()  # [C, V]
            if entropy_grad:  # -g~ * pi~ * (z - log Z_k + H~),  pi~ = pi * Z / Z_k on A_k
                w = kept_weights(z, tau[s], k, buf_w[:C]) if k < V else None  # [C, V]
                grad = z.sub_((lse_k[s] - h_clamped[s])[:, None]).mul_((-g_clamped[s] * (lse[s] - lse_k[s]).exp())[:, None])
                if w is not None:
                    grad.mul_(w)
                grad.sub_(g_logp[s, None]).mul_(pi)  # + the log-prob term -g * pi
            else:
                grad = pi.mul_(-g_logp[s, None])
            grad.scatter_add_(-1, targets[s, None], g_logp[s, None])  # + g * onehot(y)
            grad_h[s] = grad @ weight.float()  # [C, D]
            grad_w.addmm_(grad.t(), hidden[s].float())  # [V, D]
            if grad_b is not None:
                grad_b += grad.sum(0)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), grad_b, None, None, None, None, None


def token_stats(model, input_ids, attention_mask, mask, temperature=1.0, drop_frac=0.0, top_k=None, chunk=1024, entropy=True):
    """Per completion token: log pi(y_t), clamped entropy and full entropy, each [B, T], 0 where mask is 0.

    Logits exist only at kept completion positions, in fp32, `chunk` tokens at a time (`TokenStats`).
    entropy=False computes log pi(y_t) only.
    """
    T = mask.size(1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] as generate sets them under left padding
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, L, D]
    keep = mask.bool()
    hidden = hidden[:, -T - 1 : -1][keep]  # [N, D] the states that predict completion tokens
    targets = input_ids[:, -T:][keep]  # [N]
    head = model.get_output_embeddings()
    k = kept_count(head.weight.size(0), drop_frac, top_k)
    stats = TokenStats.apply(hidden, head.weight, head.bias, targets, temperature, k, chunk, entropy)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return tuple(zeros.masked_scatter(keep, x) for x in stats)  # 3 x [B, T]


# ----------------------------------------------------------------------------------------------
# 8. Policy loss
# ----------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """PPO-clip with dual clip, token-mean over mask. logp, old_logp, mask [B, T]; adv [B].

    r_t = exp(logp - old_logp);  l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)),
    and for A < 0, l_t = min(l_t, -c A). Returns (loss, stats with clip_frac and approx_kl).
    """
    mask = mask.float()
    adv = adv[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    loss_unclipped = -adv * ratio  # [B, T]
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    loss = torch.maximum(loss_unclipped, loss_clipped)  # [B, T]
    loss_dual = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)  # [B, T]
    stats = {
        "clip_frac": masked_mean((loss_clipped > loss_unclipped).float(), mask).item(),
        "dual_clip_frac": masked_mean((loss_dual < loss).float(), mask).item(),
        "approx_kl": masked_mean(old_logp - logp, mask).item(),
    }
    return masked_mean(loss_dual, mask), stats


def kl_penalty(logp, ref_logp):
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------
# 9. Coefficient update
# ----------------------------------------------------------------------------------------------
def update_entropy_coef(coef, entropy, h_low, h_high, lr, coef_min, coef_max) -> float:
    """lambda <- clip(lambda - lr * (min(0, H - H_low) + max(0, H - H_high)), lambda_min, lambda_max).

    Entropy below the band raises lambda, above it lowers lambda, inside leaves it alone.
    """
    step = min(0.0, entropy - h_low) + max(0.0, entropy - h_high)
    return float(min(max(coef - lr * step, coef_min), coef_max))


# ----------------------------------------------------------------------------------------------
# 10. Training loop
# ----------------------------------------------------------------------------------------------
# Fields that may change when a run is resumed; any other difference means a different run.
RESUMABLE = ("steps", "save_every", "keep_last", "sample_every", "max_bad_updates")


def save_checkpoint(path: str, model, tokenizer, optimizer=None, state: Optional[dict] = None):
    """Model and tokenizer (save_pretrained), plus optimizer and trainer state when given, written
    to path.tmp and renamed: a checkpoint directory is complete or absent, never half-written."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"refusing to write non-finite weights to {path}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The resumable checkpoint with the most steps in out_dir (step_*/ or final/), if any."""
    best, best_step = None, -1
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        state = os.path.join(out_dir, name, "trainer_state.pt")
        if (name.startswith("step_") or name == "final") and not name.endswith(".tmp") and os.path.isfile(state):
            step = torch.load(state, weights_only=False)["step"]
            if step > best_step:
                best, best_step = os.path.join(out_dir, name), step
    return best


def prune_checkpoints(out_dir: str, keep: int):
    steps = sorted(n for n in os.listdir(out_dir) if n.startswith("step_") and not n.endswith(".tmp"))
    for name in steps[:-keep]:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def check_same_run(args: Args):
    """An out_dir holds one run: resuming needs the same settings, bar the RESUMABLE ones."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        sys.exit(f"error: --out-dir {args.out_dir} is a file, not a directory")
    path = os.path.join(args.out_dir, "args.json")
    if not os.path.isfile(path):
        if os.path.isdir(args.out_dir) and any(n == "metrics.jsonl" or n.startswith("step_") for n in os.listdir(args.out_dir)):
            sys.exit(f"error: {args.out_dir} holds training output but no args.json; choose another --out-dir")
        return
    with open(path) as f:
        saved = json.load(f)
    now = dataclasses.asdict(args)
    changed = [k for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:4])
        sys.exit(f"error: {args.out_dir} holds a different run ({diffs}); choose another --out-dir or run with its settings to resume")


def truncate_log(path: str, last_step: int):
    """Keep the lines of a jsonl log whose step is at most last_step (a resumed run rewrites the rest)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by a crash
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def step_batches(n_problems: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices for a step: epochs of seeded permutations, a pure function of the step."""
    out, pos = [], step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(pos, n_problems)
        order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = order[offset : offset + prompts_per_step - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def prepare_problems(problems: list[dict], args: Args, tokenizer, context: Optional[int]):
    """Training problems and prompts, long prompts handled per --long-prompts, and the held-out
    (prompt, gold) pairs for --eval-every."""
    prompts = [build_prompt(tokenizer, p["question"]) for p in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    fits = [i for i, n in enumerate(lengths) if n <= args.max_prompt_tokens]
    too_long = len(problems) - len(fits)
    if too_long and (args.long_prompts == "error" or not fits):
        first = next(i for i, n in enumerate(lengths) if n > args.max_prompt_tokens)
        sys.exit(f"error: {too_long} of {len(problems)} prompts are longer than --max-prompt-tokens {args.max_prompt_tokens} "
                 f"(the first, problem {first + 1}, has {lengths[first]} tokens); raise the limit or pass --long-prompts skip")
    if too_long:
        print(f"skipped {too_long} of {len(problems)} prompts longer than {args.max_prompt_tokens} tokens")
    longest = max(lengths[i] for i in fits)
    if context and longest + args.max_new_tokens > context:
        sys.exit(f"error: the longest prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's context of {context} tokens")
    problems, prompts = [problems[i] for i in fits], [prompts[i] for i in fits]
    held_out = []
    if args.eval_every:
        if args.eval_size >= len(problems):
            sys.exit(f"error: --eval-size {args.eval_size} leaves no training problems (the dataset has {len(problems)})")
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(args.seed)).tolist()
        held_out = [(prompts[i], problems[i]["gold"]) for i in sorted(order[: args.eval_size])]
        keep = sorted(order[args.eval_size :])
        problems, prompts = [problems[i] for i in keep], [prompts[i] for i in keep]
    return problems, prompts, held_out


def policy_update(model, opt, roll, mask, adv, coef, args: Args, ref_model=None) -> dict:
    """PPO epochs over one step's rollouts: minibatches of whole groups, micro-batches inside
    (gradient accumulation with token-mean weights). An update whose loss or gradient is not
    finite is skipped. Returns token-weighted means of the loss terms, the mean gradient norm,
    and counts of updates applied, skipped, and skipped since the last applied one."""
    device = next(model.parameters()).device
    G, B = args.group_size, mask.size(0)
    # --entropy full keeps every token, so the "clamped" entropy is the full one
    drop_frac, top_k = (args.drop_frac, args.top_k) if args.entropy != "full" else (0.0, None)

    def stats(net, rows, grad=False):
        with torch.set_grad_enabled(grad), autocast(device):
            return token_stats(net, roll["input_ids"][rows], roll["attention_mask"][rows], mask[rows],
                               args.temperature, drop_frac, top_k, args.logits_chunk, entropy=grad)

    # With a single update per step the policy is still the rollout policy when the loss is
    # computed, so old log-probs are that pass's own, detached: no separate scoring pass.
    on_policy = args.ppo_epochs == 1 and args.mini_batch_prompts >= args.prompts_per_step
    micro = torch.arange(B).split(args.micro_batch_size)
    model.eval()
    old_logp = None if on_policy else torch.cat([stats(model, rows)[0] for rows in micro])  # [B, T] the rollout policy
    ref_logp = torch.cat([stats(ref_model, rows)[0] for rows in micro]) if ref_model else None  # [B, T]
    model.train()

    sums = dict(loss=0.0, clip_frac=0.0, dual_clip_frac=0.0, approx_kl=0.0, kl=0.0, h_clamped=0.0, h_full=0.0)
    tokens, grad_norms, skipped, bad_tail = 0, [], 0, 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(args.prompts_per_step)  # shuffle groups, keep each group together
        rows_all = (order[:, None] * G + torch.arange(G)).view(-1)  # [B]
        for mb in rows_all.split(args.mini_batch_prompts * G):
            n_tok = mask[mb].sum().item()
            if n_tok == 0:  # every completion masked out (--mask-truncated): nothing to learn from
                continue
            finite = True
            for rows in mb.split(args.micro_batch_size):
                m_rows = mask[rows]  # [b, T]
                n = m_rows.sum().item()
                if n == 0:  # every completion here was masked out (--mask-truncated)
                    continue
                logp, h_clamped, h_full = stats(model, rows, grad=True)  # [b, T] each
                old = logp.detach() if on_policy else old_logp[rows]  # [b, T]
                loss, st = policy_loss(logp, old, adv[rows], m_rows, args.clip_low, args.clip_high, args.dual_clip)
                if coef:  # the bonus; without it the backward skips the entropy term
                    loss = loss - coef * masked_mean(h_clamped, m_rows)
                if ref_logp is not None:
                    kl = masked_mean(kl_penalty(logp, ref_logp[rows]), m_rows)
                    loss = loss + args.beta * kl
                    sums["kl"] += kl.item() * n
                finite = finite and bool(torch.isfinite(loss))
                (loss * (n / n_tok)).backward()  # token share of the micro-batch: the minibatch loss is a token-mean
                tokens += n
                sums["loss"] += loss.item() * n
                for k in ("clip_frac", "dual_clip_frac", "approx_kl"):
                    sums[k] += st[k] * n
                sums["h_clamped"] += (h_clamped * m_rows).sum().item()
                sums["h_full"] += (h_full * m_rows).sum().item()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if finite and torch.isfinite(norm):
                opt.step()
                grad_norms.append(norm.item())
                bad_tail = 0
            else:
                skipped, bad_tail = skipped + 1, bad_tail + 1
            opt.zero_grad(set_to_none=True)
    out = {k: v / tokens if tokens else float("nan") for k, v in sums.items()}
    out.update(grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
               updates=len(grad_norms), skipped_updates=skipped, bad_tail=bad_tail)
    return out


class StopRequest:
    """Once installed, SIGINT/SIGTERM ask the loop to stop after the current step; a second
    SIGINT stops at once. The command line installs it; a caller of train() may or may not."""

    requested = None

    def install(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train(args: Args, stop: Optional[StopRequest] = None):
    from tqdm import tqdm

    check_args(args)
    stop = stop or StopRequest()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_same_run(args)
    resume = latest_checkpoint(args.out_dir)
    state = torch.load(os.path.join(resume, "trainer_state.pt"), weights_only=False) if resume else None
    if state and state["step"] >= args.steps:
        print(f"nothing to do: {resume} already holds step {state['step']} of {args.steps}")
        return None

    problems = load_problems(args.dataset, args.split)  # data errors surface before the model loads
    model, tokenizer = load_model(resume or args.model, device, args.seed)
    problems, prompts, held_out = prepare_problems(problems, args, tokenizer, getattr(model.config, "max_position_embeddings", None))
    eos_ids = stop_token_ids(model, tokenizer)
    gen = generation_config(tokenizer, eos_ids, args.max_new_tokens, args.temperature, args.top_p)
    greedy = generation_config(tokenizer, eos_ids, args.max_new_tokens, temperature=0)
    ref_model = load_model(args.model, device, args.seed)[0].eval().requires_grad_(False) if args.beta > 0 else None
    if args.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path, samples_path = os.path.join(args.out_dir, "metrics.jsonl"), os.path.join(args.out_dir, "samples.jsonl")
    start = state["step"] if state else 0
    for path in (metrics_path, samples_path):
        truncate_log(path, start)  # drop what a crashed run logged after its last checkpoint
    if state:
        opt.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt"), weights_only=False))
        coef, bad_in_a_row = state["coef"], state["bad_in_a_row"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        print(f"resuming from {resume} (step {start})")
    else:
        torch.manual_seed(args.seed)
        coef, bad_in_a_row = (args.entropy_coef if args.entropy != "none" else 0.0), 0
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=1)
    print(f"model {args.model} on {device} | {len(problems)} problems from {args.dataset} | "
          f"{args.prompts_per_step} prompts x {args.group_size} samples per step | entropy bonus: {args.entropy}")

    def checkpoint_state(step):
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        return {"step": step, "coef": coef, "bad_in_a_row": bad_in_a_row, "rng": rng}

    if stop.requested:
        print(f"stopped by {stop.requested} before the first step; nothing to save")
        return model
    G, B = args.group_size, args.prompts_per_step * args.group_size
    bar = tqdm(range(start, args.steps), desc="steps", dynamic_ncols=True, disable=None, initial=start, total=args.steps)
    for step in bar:
        t0 = time.time()
        # ---- rollout and reward --------------------------------------------------------------
        idx = step_batches(len(problems), args.prompts_per_step, step, args.seed)
        roll = rollout(model, tokenizer, [prompts[i] for i in idx], gen, G, args.rollout_batch_size)
        golds = [problems[i]["gold"] for i in idx for _ in range(G)]
        rewards = torch.tensor([grade(c, g) for c, g in zip(roll["completions"], golds)])  # [B]
        adv = group_advantages(rewards, G, scale=args.scale_adv).to(device)  # [B]
        mask = roll["mask"]  # [B, T]
        if args.mask_truncated:
            mask = mask * (~roll["truncated"])[:, None].long()
        t_rollout = time.time() - t0

        # ---- policy update -------------------------------------------------------------------
        upd = policy_update(model, opt, roll, mask, adv, coef, args, ref_model)
        bad_in_a_row = upd["bad_tail"] if upd["updates"] else bad_in_a_row + upd["skipped_updates"]
        if upd["skipped_updates"]:
            tqdm.write(f"step {step + 1:>4} | skipped {upd['skipped_updates']} update(s) with a non-finite loss or gradient")
        if bad_in_a_row >= args.max_bad_updates:
            sys.exit(f"error: {bad_in_a_row} updates in a row had a non-finite loss or gradient; stopped at step {step + 1} "
                     f"without saving (the last checkpoint is {latest_checkpoint(args.out_dir) or 'none'})")

        # ---- coefficient update ----------------------------------------------------------------
        coef_used = coef
        if args.entropy != "none" and args.adaptive_coef and step + 1 >= args.coef_warmup and upd["updates"]:
            bonus_entropy = upd["h_clamped"] if args.entropy == "clamped" else upd["h_full"]
            coef = update_entropy_coef(coef, bonus_entropy, args.h_low, args.h_high, args.coef_lr, args.coef_min, args.coef_max)

        # ---- logging -------------------------------------------------------------------------
        groups = rewards.view(-1, G)
        metrics = {
            "step": step + 1,
            "reward": rewards.mean().item(),
            "entropy_clamped": upd["h_clamped"],
            "entropy_full": upd["h_full"],
            "entropy_coef": coef_used,
            "clip_frac": upd["clip_frac"],
            "dual_clip_frac": upd["dual_clip_frac"],
            "approx_kl": upd["approx_kl"],
            "kl_ref": upd["kl"] if ref_model else None,
            "loss": upd["loss"],
            "grad_norm": upd["grad_norm"],
            "skipped_updates": upd["skipped_updates"],
            "response_len": roll["mask"].sum(1).float().mean().item(),
            "truncated_frac": roll["truncated"].float().mean().item(),
            "zero_var_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
            "rollout_time": t_rollout,
            "step_time": time.time() - t0,
        }
        if held_out and (step + 1) % args.eval_every == 0:
            completions = complete(model, tokenizer, [p for p, _ in held_out], greedy, 1, args.rollout_batch_size)
            metrics["eval_accuracy"] = sum(grade(c[0], gold) for c, (_, gold) in zip(completions, held_out)) / len(held_out)
            tqdm.write(f"step {step + 1:>4} | held-out accuracy {metrics['eval_accuracy']:.3f} on {len(held_out)} problems (greedy)")
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", H=f"{metrics['entropy_clamped']:.3f}", coef=f"{coef_used:.4g}")
        tqdm.write(
            f"step {step + 1:>4} | reward {metrics['reward']:.3f} | H~ {metrics['entropy_clamped']:.3f} "
            f"H {metrics['entropy_full']:.3f} | coef {coef_used:.4g} | clip {metrics['clip_frac']:.3f} | "
            f"len {metrics['response_len']:.0f} | {metrics['step_time']:.1f}s"
        )
        if args.sample_every and (step + 1) % args.sample_every == 0:
            samples = [
                {"step": step + 1, "prompt": prompts[idx[j // G]], "completion": roll["completions"][j],
                 "gold": golds[j], "reward": rewards[j].item()}
                for j in range(0, min(B, 3 * G), G)
            ]
            with open(samples_path, "a") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)
            for s in samples[:2]:
                tqdm.write(f"  sample (reward {s['reward']:.0f}, gold {s['gold']}): {s['completion'][:200]!r}")

        # ---- checkpoints ---------------------------------------------------------------------
        last = step + 1 == args.steps  # the last step always ends in final/
        if not last and (stop.requested or (args.save_every and (step + 1) % args.save_every == 0)):
            path = os.path.join(args.out_dir, f"step_{step + 1:06d}")
            save_checkpoint(path, model, tokenizer, opt, checkpoint_state(step + 1))
            prune_checkpoints(args.out_dir, args.keep_last)
            if stop.requested:
                bar.close()
                print(f"stopped by {stop.requested} after step {step + 1}; checkpoint in {path}; run the same command to resume")
                return model

    save_checkpoint(os.path.join(args.out_dir, "final"), model, tokenizer, opt, checkpoint_state(args.steps))
    print(f"done: {args.steps} steps, final model in {os.path.join(args.out_dir, 'final')}")
    return model


def main(argv=None):
    args = parse_args(argv)
    stop = StopRequest().install()
    try:
        train(args, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last checkpoint
        sys.exit("interrupted; the last checkpoint in --out-dir is intact")
    finally:
        stop.uninstall()


if __name__ == "__main__":
    main()
