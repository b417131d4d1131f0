"""Logprob entries for the endpoint: where each token's text starts (split UTF-8 characters included),
entries held back with the text they precede, and OpenAI's completion and chat shapes."""
import math

import pytest

from orchestration.serve.detokenize import RowText, Scored, TokenLogprob, prefix_offsets, token_start
from orchestration.serve.logprob_format import JSON_FLOOR, chat_logprobs, completion_logprobs
from rlhf.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the red fox runs over the hill", "a blue bird sings"] * 20, vocab_size=300)


def test_token_start():
    assert token_start("ab", "abc") == 2
    assert token_start("x", "x\ufffd") == 1            # a character begins
    assert token_start("x\ufffd", "x\ufffd") == 1      # ... and is still incomplete
    assert token_start("x\ufffd", "x\u2019") == 1      # ... and is completed
    assert token_start("x\ufffd", "x\ufffds") == 2     # ... or was never valid: it stays
    assert token_start("x\ufffd", "x\ufffd\ufffd") == 2


def test_prefix_offsets_put_a_split_character_at_its_start(tok):
    ids = tok.encode("x\u2019s fox", add_special_tokens=False)  # ’ is three bytes, three tokens here
    text = tok.decode(ids)
    assert tok.decode(ids[1:4]) == "\u2019" and "\ufffd" in tok.decode(ids[1:2])
    offsets = prefix_offsets(tok, ids)
    assert offsets[:5] == [0, 1, 1, 1, 2] and offsets == sorted(offsets)
    assert text[offsets[4]:] == "s fox"


def _ids(tok, chars):
    return [tok.encode(c, add_special_tokens=False)[0] for c in chars]


def test_entries_wait_for_held_back_text_and_end_inside_the_text(tok):
    row = RowText(tok, ("abc",), base=10)
    released = []
    for token in _ids(tok, "xab"):
        text, hit = row.push(token, Scored(-1.0))
        assert not hit
        released += row.take_logprobs(done=False)
    # "ab" may become the stop string: only the entries whose text start was sent are out
    assert row.sent == 1 and [e.offset for e in released] == [10, 11]
    text, hit = row.push(_ids(tok, "c")[0], Scored(-1.0))
    assert hit and text == ""
    rest = row.take_logprobs(done=True)
    assert [e.offset for e in rest] == [11, 11]  # clamped to the end of the text ("x")
    assert len(released + list(rest)) == 4


def _entry(token, logprob, top, offset=0):
    return TokenLogprob(token, None if logprob is None else Scored(logprob, top), offset)


def test_completion_shape_adds_the_chosen_token_and_floors_minus_infinity():
    entries = [_entry(1, None, ()), _entry(2, -3.0, ((5, -0.5), (6, -1.0)), 1),
               _entry(5, -0.5, ((5, -0.5), (6, -1.0)), 2), _entry(7, -math.inf, (), 3)]
    out = completion_logprobs(entries, lambda t: f"<{t}>")
    assert out.tokens == ["<1>", "<2>", "<5>", "<7>"] and out.text_offset == [0, 1, 2, 3]
    assert out.token_logprobs == [None, -3.0, -0.5, JSON_FLOOR]
    assert out.top_logprobs[0] is None
    assert list(out.top_logprobs[1].items()) == [("<5>", -0.5), ("<6>", -1.0), ("<2>", -3.0)]
    assert list(out.top_logprobs[2].items()) == [("<5>", -0.5), ("<6>", -1.0)]  # chosen among the top
    assert out.top_logprobs[3] == {"<7>": JSON_FLOOR}
    # two tokens with one text: the likelier one's value
    same = completion_logprobs([_entry(2, -3.0, ((5, -0.5), (6, -1.0)))], lambda t: "x")
    assert same.top_logprobs == [{"x": -0.5}]


def test_chat_shape_has_exactly_the_asked_alternatives_with_bytes():
    out = chat_logprobs([_entry(2, -3.0, ((5, -0.5),))], lambda t: {2: "é", 5: "a"}[t])
    item = out.content[0]
    assert (item.token, item.logprob, item.bytes) == ("é", -3.0, [0xC3, 0xA9])
    assert [(t.token, t.logprob, t.bytes) for t in item.top_logprobs] == [("a", -0.5, [97])]
    with pytest.raises(ValueError):
        chat_logprobs([_entry(1, None, ())], str)
