"""Problems and what each step sees: datasets read into {'question', 'gold'} rows (the gold
answer is half of the reward), prompt lengths checked, the held-out split, and the data order,
a function of the step so that a resumed run sees what an uninterrupted one would."""

import json
import os
import sys
from typing import Optional

import torch

from grader import last_boxed
from support.demo import toy_problems

HUB_DATASETS = {  # name: (hub id, config); --split picks train or test
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", None),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "openr1": ("open-r1/OpenR1-Math-220k", "default"),  # problem, answer; train split only
}


def load_problems(dataset: str, split: str = "train") -> list[dict]:
    """Problems {'question', 'gold'} from a hub dataset by name, a local .jsonl/.parquet file
    (rows with question or problem, and answer or a \\boxed{} in solution), or the toy task.
    A hub row without question or gold is skipped; in a local file it is an error naming it."""
    if dataset == "toy":
        return toy_problems()
    rows, local = read_rows(dataset, split)
    problems = []
    for n, row in rows:
        problem = problem_from_row(row)
        if problem is None and local:
            where = "line" if dataset.endswith(".jsonl") else "row"
            sys.exit(
                f"error: {dataset} {where} {n}: needs a question/problem and a gold answer "
                "(answer, or \\boxed{} in solution)"
            )
        problems += [problem] if problem else []
    if not problems:
        sys.exit(f"error: {dataset} has no rows with a question/problem and an answer/solution")
    return problems


def problem_from_row(row: dict) -> Optional[dict]:
    """A dataset row -> {'question', 'gold'[, 'level', 'subject']}, or None if it lacks either.

    Gold is `answer` (GSM8K's '... #### 1,600' -> '1600'), else the last \\boxed{} of `solution`.
    """
    question, gold = row.get("question") or row.get("problem"), row.get("answer")
    if gold is not None and "####" in str(gold):
        gold = str(gold).split("####")[-1].replace(",", "")
    elif gold is None and row.get("solution"):
        gold = last_boxed(str(row["solution"]))
    if not str(question or "").strip() or not str(gold if gold is not None else "").strip():
        return None
    problem = {"question": str(question).strip(), "gold": str(gold).strip()}
    level, subject = row.get("level"), row.get("subject") or row.get("type")
    if level is not None:
        problem["level"] = f"Level {level}" if isinstance(level, int) else str(level)
    if subject:
        problem["subject"] = str(subject)
    return problem


def read_rows(dataset: str, split: str):
    """([(line number, row)], is_local) from a hub dataset by name or a .jsonl/.parquet file."""
    import datasets

    datasets.disable_progress_bars()
    if dataset in HUB_DATASETS:
        name, config = HUB_DATASETS[dataset]
        try:
            return list(enumerate(datasets.load_dataset(name, config, split=split), 1)), False
        except Exception as e:  # offline, unknown split, ...: the library raises many kinds
            sys.exit(f"error: cannot load {name} (split {split!r}): {str(e).splitlines()[0]}")
    if not dataset.endswith((".jsonl", ".parquet")):
        names = ", ".join(HUB_DATASETS)
        sys.exit(f"error: unknown dataset {dataset!r}: use {names}, toy, or a .jsonl/.parquet file")
    if not os.path.isfile(dataset):
        sys.exit(f"error: dataset file {dataset} not found")
    if dataset.endswith(".jsonl"):
        return read_jsonl(dataset), True
    try:
        rows = datasets.load_dataset("parquet", data_files=dataset, split="train")
    except Exception as e:
        sys.exit(f"error: cannot read {dataset} as parquet: {str(e).splitlines()[0]}")
    return list(enumerate(rows, 1)), True


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a .jsonl file; a bad line is an error."""
    rows = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8-sig"))
                except (ValueError, UnicodeDecodeError, RecursionError) as e:  # 1e5-deep [[[...
                    sys.exit(f"error: {path} line {n}: not valid JSON ({str(e)[:80]})")
                if not isinstance(row, dict):
                    sys.exit(f"error: {path} line {n}: not a JSON object")
                rows.append((n, row))
    except OSError as e:
        sys.exit(f"error: cannot read {path}: {e.strerror}")
    return rows


def training_pairs(prompts, golds, tokenizer, context, max_prompt_tokens, max_new_tokens,
                   long_prompts="skip", eval_size=0, seed=0):  # fmt: skip
    """(prompt, gold) pairs to train on and `eval_size` held-out ones (for --eval-every). Prompts
    over max_prompt_tokens are skipped with a count (long_prompts 'skip') or an error ('error');
    the longest kept prompt + max_new_tokens must fit the model's context."""
    lengths = prompt_lengths(tokenizer, prompts, max_prompt_tokens)
    skip = long_prompts == "skip"
    keep = prompts_that_fit(lengths, max_prompt_tokens, max_new_tokens, context, skip)
    return hold_out([(prompts[i], golds[i]) for i in keep], eval_size, seed)


def prompt_lengths(tokenizer, prompts: list[str], limit: int) -> list[int]:
    """Token counts of prompts. A token spells at most `longest` characters, so a prompt of more
    than limit * longest characters is over the limit untokenized (counted as limit + 1): a
    50 MB line is refused at once instead of after minutes and gigabytes of tokenizing."""
    longest = max(map(len, tokenizer.get_vocab()))
    short = [i for i, p in enumerate(prompts) if len(p) <= limit * longest]
    texts = [prompts[i] for i in short]
    counted = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    lengths = [limit + 1] * len(prompts)
    for i, ids in zip(short, counted):
        lengths[i] = len(ids)
    return lengths


def prompts_that_fit(
    lengths: list[int], limit: int, max_new_tokens: int, context: Optional[int], skip: bool
) -> list[int]:
    """Indices of the prompts of at most `limit` tokens; the others are skipped with a count
    (skip) or are an error. The longest kept prompt + max_new_tokens must fit the context."""
    fits = [i for i, n in enumerate(lengths) if n <= limit]
    too_long = len(lengths) - len(fits)
    if too_long and (not skip or not fits):
        first = next(i for i, n in enumerate(lengths) if n > limit)
        sys.exit(
            f"error: {too_long} of {len(lengths)} prompts are longer than --max-prompt-tokens "
            f"{limit} (the first is problem {first + 1}); raise the limit"
            + (" or pass --long-prompts skip" if fits else "")
        )
    if too_long:
        print(f"skipped {too_long} of {len(lengths)} prompts longer than {limit} tokens")
    longest = max(lengths[i] for i in fits)
    if context and longest + max_new_tokens > context:
        sys.exit(
            f"error: the longest prompt ({longest} tokens) + --max-new-tokens "
            f"({max_new_tokens}) exceeds the model's context of {context} tokens"
        )
    return fits


def hold_out(pairs: list, size: int, seed: int):
    """(training pairs, `size` held-out pairs for --eval-every), a seeded split in data order."""
    if not size:
        return pairs, []
    if size >= len(pairs):
        sys.exit(f"error: --eval-size {size} must be below the {len(pairs)} problems")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = sorted(order[:size])
    return [pairs[i] for i in sorted(order[size:])], [pairs[i] for i in held_out]


def step_batch(n_problems: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices for a step: epochs of seeded permutations, a pure function of the step,
    so a resumed run sees the data an uninterrupted one would."""
    out, pos = [], step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(pos, n_problems)
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        take = torch.randperm(n_problems, generator=gen)[offset:][: prompts_per_step - len(out)]
        out += take.tolist()
        pos += len(take)
    return out


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a step's sampling and shuffling on a rank: a function of the three, so that a
    resumed run draws what an uninterrupted one on the same number of ranks would."""
    return (seed * 1_000_003 + step) * 4096 + rank
