"""The offline CPU demo (`python aent.py --model tiny`): a toy task and a randomly initialised
tiny model that learns it within a minute, through the code of a real run."""

import string

import torch

# Applied with --model tiny to every flag not given on the command line.
TINY_DEMO = dict(
    dataset="toy", out_dir="runs/tiny", steps=150, prompts_per_step=16, group_size=16,
    max_prompt_tokens=64, max_new_tokens=2, mini_batch_prompts=8, micro_batch_size=128, lr=1e-3,
    weight_decay=0.0, entropy_coef=0.01, h_low=0.5, h_high=1.5, coef_lr=0.01, coef_min=0.001,
    coef_max=0.05, coef_warmup=5, save_every=0, logits_chunk=256,
)  # fmt: skip


def toy_problems() -> list[dict]:
    """The demo's task: 'Repeat 7' -> '7', for the ten digits."""
    return [{"question": f"Repeat {d}", "gold": str(d)} for d in range(10)]


def build_tiny(seed: int = 0):
    """A randomly initialised 2-layer Qwen2 with a 99-token character-level tokenizer, offline.

    The tokenizer is a Qwen2Tokenizer (byte-level BPE without merges) over the printable ASCII
    characters, so a saved checkpoint reloads through AutoTokenizer unchanged. Characters
    outside that set are dropped.
    """
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    byte_level = [{" ": "\u0120", "\n": "\u010a"}.get(c, c) for c in chars]  # GPT-2's names
    vocab = {t: i for i, t in enumerate(specials + byte_level)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=specials[1:])
    return tiny_model(tokenizer, seed), tokenizer


def tiny_model(tokenizer, seed: int):
    """The demos' 2-layer, 64-wide Qwen2 over `tokenizer`'s vocabulary, random from `seed`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def confident_tiny_head(model):
    """The tiny model as a LoRA base. LoRA leaves the final norm and the (tied) head frozen, and
    at their random initialisation they cap the probability of any one digit at 2.8-4.3%
    (measured by optimising the last hidden state), so no adapter can make the demo's answer
    likely. A pretrained head has no such cap; scaling the final norm's weights from 1 to 10
    lifts it."""
    with torch.no_grad():
        model.model.norm.weight.fill_(10.0)


# The same task at the real vocabulary size (vocab_demo.py): the paper's argument in a language
# model. The 99 characters plus filler tokens up to Qwen2.5's 151,936, none of which spells a digit.
QWEN_VOCAB = 151_936


def filler_tokens(n: int) -> list[str]:
    """n distinct strings of 2 to 4 ASCII letters ('aa', 'ab', ...): tokens that decode to text
    with no digit in it, so a completion of filler can never be graded correct."""
    import itertools

    letters = string.ascii_letters
    words = ("".join(t) for size in (2, 3, 4) for t in itertools.product(letters, repeat=size))
    return list(itertools.islice(words, n))


def build_tiny_vocab(seed: int = 0, vocab_size: int = QWEN_VOCAB):
    """build_tiny's model and tokenizer with the vocabulary padded by filler tokens to vocab_size
    (Qwen2.5's by default). Text encodes as in build_tiny (no merges: filler is never produced
    by encoding) and decodes the same; a filler id decodes to its letters."""
    from transformers import Qwen2Tokenizer

    _, small = build_tiny(seed)
    vocab = dict(small.get_vocab())
    for word in filler_tokens(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    specials = ["<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=specials)
    return tiny_model(tokenizer, seed), tokenizer
