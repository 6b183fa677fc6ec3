"""vocab_demo.py: the tiny model at Qwen2.5's 151,936-token vocabulary, and the direction of its
finding in a short run."""

import pytest

import vocab_demo
from grader import grade
from support import demo


def test_the_filler_vocabulary_round_trips_the_task_and_never_decodes_a_digit():
    model, tokenizer = demo.build_tiny_vocab(0)
    _, small = demo.build_tiny(0)
    assert len(tokenizer) == model.config.vocab_size == 151_936
    texts = ["Question: Repeat 7\nAnswer:", "7", "Repeat 0 and 9, then stop."]
    for text in texts:  # encodes as the 99-token demo does (filler is never produced) and back
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == small(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    filler = range(len(small), len(tokenizer))
    decoded = tokenizer.batch_decode([[i] for i in filler])
    assert len(set(decoded)) == len(filler)  # distinct, each a word of letters
    assert all(t.isascii() and t.isalpha() for t in decoded)
    everything = tokenizer.decode(list(filler))
    assert not any(c.isdigit() for c in everything) and grade(everything, "7") == 0.0


@pytest.mark.slow
def test_a_short_run_shows_the_full_and_p033_bonuses_spreading_and_a_top10_set_not(tmp_path):
    """12 RL steps from one warm start (the full demo runs 30, over 3 seeds): the full bonus
    and the clamped one at p = 0.33 push H up towards log 151,936 = 11.93 nats (8.7 and 8.3 at
    step 12 when written); with 10 kept tokens H stays near the digits' log 10 = 2.3 (2.5)."""
    runs = {m: vocab_demo.run(m, 0, str(tmp_path), steps=12) for m in ("full", "clamped", "top10")}
    final = {m: ms[-1] for m, ms in runs.items()}
    assert final["full"]["entropy_full"] > 6 and final["clamped"]["entropy_full"] > 6
    assert final["top10"]["entropy_full"] < 3.5
    assert final["clamped"]["dropped_mass"] > 0.05  # spread into the dropped third as well
    reward = {m: sum(r["reward"] for r in ms[-2:]) / 2 for m, ms in runs.items()}
    assert reward["top10"] > reward["full"] + 0.1  # 0.45 against 0.12 when written
