"""The serving engine's decoding loop without Ray: greedy = transformers' greedy, seeded rows ignore
their batch, stop strings end a row (which then gets no more deltas), length limits per row."""
import pytest
import torch

from orchestration.serve.engine import Row, ServeEngine
from rlhf.tiny import make_tiny_base

TEXTS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    checkpoint = make_tiny_base(tmp_path_factory.mktemp("serve") / "tiny", TEXTS, vocab_size=300,
                                n_positions=96, n_embd=32, n_layer=2, n_head=2)
    return ServeEngine(checkpoint)


def _run(engine, rows):
    """(texts, finish reasons, token counts, steps each row got a delta in)."""
    texts, reasons, tokens, seen = [""] * len(rows), [None] * len(rows), [0] * len(rows), [0] * len(rows)
    for deltas in engine.steps(rows):
        assert len(deltas) == len(rows)
        for i, d in enumerate(deltas):
            if d is not None:
                assert reasons[i] is None  # nothing after a row's last delta
                texts[i] += d.text
                reasons[i], tokens[i], seen[i] = d.finish_reason, d.tokens, seen[i] + 1
    return texts, reasons, tokens, seen


def test_greedy_rows_equal_transformers_generate(engine):
    prompts = [engine.encode("the quick brown"), engine.encode("fox"), engine.encode("lazy dog 4")]
    rows = [Row(p, 10, temperature=0.0) for p in prompts] + [Row(prompts[0], 10, top_p=0.0, seed=1)]
    texts, reasons, tokens, _ = _run(engine, rows)
    for i, p in enumerate(prompts + prompts[:1]):
        ref = engine.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=10, do_sample=False, pad_token_id=engine.pad_id)
        new = ref[0, len(p):].tolist()
        assert texts[i] == engine.tokenizer.decode(new, skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
        assert tokens[i] == len(new)
        assert reasons[i] == ("stop" if new[-1] == engine.eos_id else "length")


def test_seeded_rows_are_the_same_alone_and_batched(engine):
    p, q = engine.encode("the quick brown"), engine.encode("over the")
    rows = [Row(p, 16, seed=s) for s in range(3)] + [Row(q, 12, 0.7, 0.9, seed=9), Row(q, 5, 0.0)]
    batched = _run(engine, rows)
    for i, row in enumerate(rows):
        alone = _run(engine, [row])
        assert [x[0] for x in alone] == [x[i] for x in batched], i
    assert len(set(batched[0][:3])) > 1  # different seeds, different texts


def test_stop_string_ends_the_row_and_length_limits_hold(engine):
    p = engine.encode("the quick brown")
    free = _run(engine, [Row(p, 24, seed=4)])[0][0]
    stop = free.strip()[2:4]  # occurs in the free text, not at its very start
    assert stop and stop in free
    texts, reasons, tokens, seen = _run(engine, [Row(p, 24, stop=(stop,), seed=4), Row(p, 3, seed=5)])
    assert texts[0] == free[:free.index(stop)] and reasons[0] == "stop"
    assert seen[0] == tokens[0] < 24
    assert reasons[1] in ("stop", "length") and tokens[1] <= 3 and seen[1] == tokens[1]
