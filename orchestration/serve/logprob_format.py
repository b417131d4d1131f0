"""The engine's logprob entries in OpenAI's two response shapes (legacy completions, chat).

Values are the model's raw logprobs (see `rlhf.logprobs`). Token strings are
each token decoded alone (special tokens by name), as vLLM shows them; a token
holding part of a UTF-8 character shows U+FFFD there, and so do its `bytes`.
"""
from __future__ import annotations

from typing import Callable, Sequence

from orchestration.serve import protocol as P
from orchestration.serve.detokenize import TokenLogprob

JSON_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens at this floor

TokenText = Callable[[int], str]


def _value(logprob: float) -> float:
    return max(logprob, JSON_FLOOR)


def completion_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText) -> P.CompletionLogprobs:
    """Parallel lists; each position's dict holds its top alternatives plus the chosen token.

    Keys are token strings, so two tokens with the same text keep the likelier one.
    """
    out = P.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        out.tokens.append(text_of(e.token))
        out.text_offset.append(e.offset)
        if e.scored is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        by_token = dict(e.scored.top)
        by_token.setdefault(e.token, e.scored.logprob)
        top: dict[str, float] = {}
        for token, logprob in sorted(by_token.items(), key=lambda kv: -kv[1]):  # stable on ties
            top.setdefault(text_of(token), _value(logprob))
        out.token_logprobs.append(_value(e.scored.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TokenText) -> P.ChatLogprobs:
    """One item per completion token, with exactly the top alternatives asked for."""
    def item(token: int, logprob: float) -> P.TopLogprob:
        text = text_of(token)
        return P.TopLogprob(token=text, logprob=_value(logprob), bytes=list(text.encode("utf-8")))

    content = []
    for e in entries:
        if e.scored is None:  # chat never echoes: every token has a logprob
            raise ValueError(f"token {e.token} has no logprob")
        head = item(e.token, e.scored.logprob)
        content.append(P.ChatTokenLogprob(**head.model_dump(),
                                          top_logprobs=[item(t, lp) for t, lp in e.scored.top]))
    return P.ChatLogprobs(content=content)
