"""The serving engine's decoding loop without Ray: greedy = transformers' greedy, seeded rows ignore
their batch, stop strings end a row (which then gets no more deltas), length limits per row."""
import pytest
import torch

from orchestration.serve.engine import Delta, Row, ServeEngine
from rlhf.tiny import build_tiny_model, make_tiny_base, never_emit, train_tokenizer

TEXTS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    checkpoint = make_tiny_base(tmp_path_factory.mktemp("serve") / "tiny", TEXTS, vocab_size=300,
                                n_positions=96, n_embd=32, n_layer=2, n_head=2)
    return ServeEngine(checkpoint)


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """An engine whose model never emits EOS: every row runs to its max_tokens."""
    folder = tmp_path_factory.mktemp("endless")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=96)
    never_emit(model, tok.eos_token_id)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return ServeEngine(folder)


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


def _entries(engine, rows):
    """(texts, entries per row, token counts) with every delta's logprob entries concatenated."""
    texts, entries, tokens = [""] * len(rows), [[] for _ in rows], [0] * len(rows)
    for deltas in engine.steps(rows):
        for i, d in enumerate(deltas):
            if d is not None:
                texts[i] += d.text
                entries[i] += d.logprobs
                tokens[i] = d.tokens
                assert all(e.offset <= len(texts[i]) for e in d.logprobs)  # never past what was sent
    return texts, entries, tokens


def _raw(engine, ids):
    with torch.no_grad():  # one pass over the whole sequence, no cache
        return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_logprob_rows_get_raw_logprobs_and_the_same_text(engine):
    p = engine.encode("the quick brown")
    rows = [Row(p, 12, 0.7, 0.9, seed=3, logprobs=3), Row(p, 12, 0.0, logprobs=0), Row(p, 12, seed=3)]
    texts, entries, tokens = _entries(engine, rows)
    plain = _run(engine, [Row(p, 12, 0.7, 0.9, seed=3), Row(p, 12, 0.0)])[0]
    assert texts[:2] == plain and entries[2] == []
    for i in (0, 1):
        assert len(entries[i]) == tokens[i]
        ids = p + [e.token for e in entries[i]]
        raw = _raw(engine, ids)
        for k, e in enumerate(entries[i]):
            want = raw[len(p) + k - 1]
            assert abs(e.scored.logprob - float(want[e.token])) < 1e-4
            assert [t for t, _ in e.scored.top] == want.topk(rows[i].logprobs).indices.tolist()
        offsets = [e.offset for e in entries[i]]
        assert offsets == sorted(offsets) and offsets[0] == 0
        assert _whole_tokens_at_their_offsets(engine, texts[i], entries[i]) > 0


def _decode(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _whole_tokens_at_their_offsets(engine, text, entries) -> int:
    """Every token that is whole characters on its own sits at its offset in `text`; how many were."""
    checked, special = 0, set(engine.tokenizer.all_special_ids)
    for e in entries:
        t = engine.token_text(e.token)
        if "\ufffd" not in t and e.token not in special:  # not half a character; specials have no text
            assert text[e.offset:e.offset + len(t)] == t, (e, text)
            checked += 1
    return checked


def test_echo_scores_the_prompt_and_max_tokens_zero_ends_there(engine):
    p, q = engine.encode("the quick brown fox"), engine.encode("lazy dog 7")
    rows = [Row(p, 0, echo=True, logprobs=2), Row(q, 5, seed=1, echo=True, logprobs=1),
            Row(q, 5, seed=1), Row(p, 0, echo=True)]
    first = next(iter(engine.steps(rows)))
    assert [d.finish_reason for d in first] == ["length", None, None, "length"]
    assert first[0].text == first[3].text == _decode(engine, p) and first[2] == Delta("", None, 0)
    texts, entries, tokens = _entries(engine, rows)
    assert tokens[0] == tokens[3] == 0 and entries[3] == []
    assert texts[1] == _decode(engine, q) + texts[2]  # the echo, then the same completion
    for ids, got in ((p, entries[0]), (q, entries[1][:len(q)])):
        raw = _raw(engine, ids)
        assert [e.token for e in got] == ids and got[0].scored is None and got[0].offset == 0
        for k, e in enumerate(got[1:]):
            assert abs(e.scored.logprob - float(raw[k, ids[k + 1]])) < 1e-4
            torch.testing.assert_close(torch.tensor([lp for _, lp in e.scored.top]),
                                       raw[k].topk(len(e.scored.top)).values, atol=1e-4, rtol=0)
    assert len(entries[0][1].scored.top) == 2 and len(entries[1][1].scored.top) == 1
    assert _whole_tokens_at_their_offsets(engine, texts[0], entries[0]) == len(p)  # plain words
    assert _whole_tokens_at_their_offsets(engine, texts[1], entries[1]) >= len(q)
    assert len(entries[1]) == len(q) + tokens[1]
    assert entries[1][len(q)].offset == len(_decode(engine, q))  # the completion starts after the echo


def test_stop_string_holds_back_logprob_entries_and_clamps_their_offsets(engine):
    p = engine.encode("the quick brown")
    free = _run(engine, [Row(p, 24, seed=4)])[0][0]
    stop = free.strip()[2:4]
    texts, entries, tokens = _entries(engine, [Row(p, 24, stop=(stop,), seed=4, logprobs=1)])
    assert texts[0] == free[:free.index(stop)] and len(entries[0]) == tokens[0]
    assert all(e.offset <= len(texts[0]) for e in entries[0])


def test_dropped_rows_stop_decoding_and_the_others_go_on_unchanged(endless):
    p = endless.encode("the quick brown")
    rows = [Row(p, 40, seed=s) for s in range(4)]
    texts, reasons, tokens, _ = _run(endless, rows)
    assert reasons == ["length"] * 4 and tokens == [40] * 4  # no EOS: the full 40 tokens each
    gone: set[int] = set()
    got, seen, steps = [""] * 4, [0] * 4, 0
    for k, deltas in enumerate(endless.steps(rows, dropped=lambda: gone)):
        steps += 1
        for i, d in enumerate(deltas):
            if d is not None:
                got[i] += d.text
                seen[i] += 1
        if k == 4:
            gone |= {0, 2}  # their callers left after the 5th token
    assert seen == [6, 40, 6, 40]  # the step under way when they left, then nothing
    assert [got[1], got[3]] == [texts[1], texts[3]] and steps == 40

    gone, steps = set(), 0
    for k, _ in enumerate(endless.steps(rows, dropped=lambda: gone)):
        steps += 1
        gone |= {0, 1, 2, 3} if k == 2 else set()
    assert steps == 4  # every caller gone: the decode ends, the batch is free
