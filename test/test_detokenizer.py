from __future__ import annotations

import random

from nanocp.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_str, load_tokenizer


def test_incremental_deltas_add_up_to_full_decode(moe_model):
    tok = load_tokenizer(moe_model)
    text = "naïve café über 東京 日本語 → λ π ✓ the expert router 12345"
    ids = tok.encode(text)
    rng = random.Random(0)
    for trial in range(20):
        seq = ids if trial == 0 else [rng.randrange(0, len(tok)) for _ in range(40)]
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.step(seq[: i + 1]) for i in range(len(seq))]
        pieces.append(detok.finish(seq))
        assert "".join(pieces) == tok.decode(seq, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in pieces[:-1]) or trial > 0
    assert tok.decode(ids) == text


def test_find_stop_str_earliest_match():
    assert find_stop_str("hello world", ["wor", "lo"], 0) == (3, "lo")
    assert find_stop_str("hello world", ["xyz"], 0) is None
    # only text from search_from on (minus the stop length) is searched
    assert find_stop_str("ab ab", ["ab"], 4) == (3, "ab")
