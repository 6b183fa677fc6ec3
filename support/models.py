"""Models: the policy to train (all weights, or a frozen base with LoRA adapters), loaded from
the hub, a directory or the tiny demo; checks of what a model directory holds (a missing or
damaged one is one error line); and saving one that transformers 4.x reads too."""

import json
import os
import shutil
import struct
import sys
from typing import Optional

import torch

from support.demo import build_tiny, confident_tiny_head


def load_model(name: str, device: torch.device, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer) from the hub, a local directory, or 'tiny'. Trained weights stay fp32:
    on GPU the passes run under bf16 autocast, because bf16 weights would round away updates of
    the size lr = 2e-6 makes. A frozen LoRA base and evaluation may load bf16 weights."""
    if name == "tiny":
        model, tokenizer = build_tiny(seed)
    else:
        model, tokenizer = from_pretrained(name, dtype)
    tokenizer.padding_side = "left"  # generate appends to the right end of every row
    return model.to(device=device, dtype=dtype), tokenizer


def autocast(device: torch.device):
    """The passes' precision: bf16 autocast on a GPU (the weights stay fp32), none on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def frozen_dtype(device: torch.device) -> torch.dtype:
    """Weights that never change (a LoRA base, a model to evaluate): bf16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_policy(name, device, seed=0, lora_rank=0, lora_alpha=32.0, resume: Optional[str] = None):
    """(model to train, tokenizer): all weights in fp32, from the checkpoint `resume` if given;
    or, with lora_rank > 0, model `name` frozen as the base (in bf16 on a GPU: it never changes)
    with fp32 adapters from peft on every linear layer, W x + (alpha / r) B A x with B = 0 at
    the start, or the adapters of the checkpoint's adapter/. Dropout is 0: on-policy importance
    ratios must be exactly 1."""
    if not lora_rank:
        return load_model(resume or name, device, seed)
    from peft import LoraConfig, PeftModel, get_peft_model

    base, tokenizer = load_model(name, device, seed, frozen_dtype(device))
    if name == "tiny":  # the CPU demo: a random head cannot be confident (see there)
        confident_tiny_head(base)
    if resume:
        adapter = os.path.join(resume, "adapter")
        problem = saved_model_problem(adapter, "adapter_config.json", tokenizer=False)
        try:  # weights_only: a crafted adapter_model.bin runs no code, and is refused here
            model = None if problem else PeftModel.from_pretrained(base, adapter, is_trainable=True)
        except Exception as e:
            problem = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if problem:
            sys.exit(f"error: cannot load the LoRA adapters in {adapter}: {problem}")
        return model, tokenizer
    torch.manual_seed(seed)  # A's random initialisation, the same on every rank
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                        target_modules="all-linear")  # fmt: skip
    return get_peft_model(base, config), tokenizer


def from_pretrained(name: str, dtype):
    """(model, tokenizer) with AutoModelForCausalLM and AutoTokenizer; a missing or damaged
    local directory, or a failed download, is one error line. A tokenizer without a pad token
    pads with EOS (the completion mask works by position, so that is safe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model {name!r}: {str(e).splitlines()[0]}")
    if tokenizer.pad_token_id is None:  # padding is needed for batches: EOS serves
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's and the checkpoint's EOS, and Qwen's
    <|im_end|> and <|endoftext|> (base models end on the latter, chat turns on the former)."""
    eos = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
    return sorted(i for i in ids if i is not None)


def check_model_path(name: str):
    """A local model directory must exist and hold a config, a tokenizer and complete weights."""
    if os.path.isdir(name):
        problem = saved_model_problem(name)
        if problem:
            sys.exit(f"error: cannot load model directory {name}: {problem}")
    elif name.startswith((".", "/", "~")) or os.path.exists(name):
        sys.exit(f"error: model directory {name} does not exist")


def saved_model_problem(path: str, config="config.json", tokenizer=True) -> Optional[str]:
    """What keeps `from_pretrained` from loading directory `path` (None if nothing visible):
    a missing or damaged config (or adapter_config.json), no tokenizer, no weights, or a
    truncated .safetensors."""
    try:
        with open(os.path.join(path, config), "rb") as f:
            json.load(f)
    except OSError:
        if tokenizer and os.path.isdir(os.path.join(path, "adapter")):
            return "it holds LoRA adapters alone (adapter/); the run's final/ is a whole model"
        return f"it has no {config}"
    except ValueError:
        return f"its {config} is damaged"
    if tokenizer and (problem := tokenizer_problem(path)):
        return problem
    names = os.listdir(path)
    shards = [n for n in names if n.endswith(".safetensors")]
    pickles = config != "adapter_config.json" and any(n.endswith(".bin") for n in names)
    if not shards and not pickles:  # aent.py writes adapters as .safetensors, nothing else
        return "it has no weights (.safetensors)"
    for name in shards:
        if not safetensors_complete(os.path.join(path, name)):
            return f"its {name} is truncated or damaged"
    return None


def tokenizer_problem(path: str) -> Optional[str]:
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, f)) for f in tokenizer_files):
        return "it has no tokenizer (tokenizer.json); save one beside the model"
    return None


def safetensors_complete(path: str) -> bool:
    """A .safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: complete when the file ends where the last range does."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def save_model(model, tokenizer, path: str, weights=None):
    """save_pretrained (of `weights`, a whole state dict, when given), readable by transformers
    4.x as well: the tokenizer's source files and a top-level rope_theta (see save_tokenizer and
    add_legacy_rope_theta)."""
    model.save_pretrained(path, state_dict=weights)
    add_legacy_rope_theta(path)
    save_tokenizer(tokenizer, path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja")  # fmt: skip


def save_tokenizer(tokenizer, path: str):
    """Copy the files the tokenizer was loaded from, as they were: training never changes it, and
    transformers 4.x (the Qwen2.5-Math harness, many vLLM builds) cannot read the
    tokenizer_config.json that transformers 5 writes. A tokenizer built in memory (the tiny
    demo) is written by save_pretrained."""
    source = tokenizer.name_or_path
    if source and not os.path.isdir(source):  # a hub id: its files in the local cache
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "tokenizer_config.json", local_files_only=True)
            source = os.path.dirname(found) if found else None
        except Exception:
            source = None
    files = [os.path.join(source, f) for f in TOKENIZER_FILES] if source else []
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return tokenizer.save_pretrained(path)
    for f in files:
        shutil.copyfile(f, os.path.join(path, os.path.basename(f)))


def add_legacy_rope_theta(path: str):
    """transformers 5 writes rope_theta inside rope_parameters; 4.x reads only a top-level
    rope_theta and would silently use 10000. Write both."""
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
