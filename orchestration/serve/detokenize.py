"""Incremental detokenization for the serving engine: stop strings, held-back text, logprob entries.

A choice's text grows one token at a time, but not all of it can be sent at
once: a tail that may still become a stop string, or an incomplete UTF-8
character, is held back. Logprob entries follow the text: a token's entry is
released once the text before it has been sent, so its `offset` (where its text
starts in the choice's text) never points past what the client ends up with,
and a streamed choice's entries concatenate to the non-streamed ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

REPLACEMENT = "\ufffd"  # what decode shows for an incomplete UTF-8 character


@dataclass(frozen=True)
class Scored:
    """A token's raw logprob and its top alternatives ((token, logprob), most likely first)."""
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a choice as the response's logprobs show it."""
    token: int
    scored: Scored | None  # None: a prompt's first token, which nothing conditions
    offset: int            # characters of the choice's text (echo included) before this token's


def token_start(before: str, after: str) -> int:
    """Where a token's text starts, from the text before and after it: the part of `before` kept.

    A trailing U+FFFD of `after` is an incomplete character that later bytes may
    still complete (decoders show one for it), so it does not count as kept yet.
    """
    if after.endswith(REPLACEMENT):
        after = after[:-1]
    return len(os.path.commonprefix([before, after]))


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def prefix_offsets(tokenizer, ids: Sequence[int]) -> list[int]:
    """Each token's character offset in decode(ids), by `token_start` over the prefixes' decodes.

    The running maximum keeps offsets monotone for tokenizers whose prefix
    decodes are not prefixes of one another (e.g. a dropped leading space).
    """
    texts = tokenizer.batch_decode([list(ids[:i]) for i in range(len(ids) + 1)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    out, best = [], 0
    for before, after in zip(texts, texts[1:]):
        best = max(best, token_start(before, after))
        out.append(best)
    return out


@dataclass
class RowText:
    """One choice's text with stop-string hold-back, and its logprob entries (after `base` echoed chars)."""
    tokenizer: object
    stop: tuple[str, ...]
    base: int = 0  # length of the echoed prompt text that precedes the completion
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # completion characters already emitted
    _text: str = ""
    _offset: int = 0
    _pending: list[TokenLogprob] = field(default_factory=list)

    def push(self, token: int, scored: Scored | None = None) -> tuple[str, bool]:
        """Add a token; return (text now safe to emit, whether a stop string was hit).

        With `scored`, the token gets a logprob entry (`take_logprobs`).
        """
        self.ids.append(token)
        before, text = self._text, decode(self.tokenizer, self.ids)
        self._text = text
        self._offset = max(self._offset, token_start(before, text))
        if scored is not None:
            self._pending.append(TokenLogprob(token, scored, self.base + self._offset))
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._emit(text, min(hits)), True
        # Hold back a tail that may still grow into a stop string or a character.
        safe = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        return self._emit(text, safe), False

    def flush(self) -> str:
        return self._emit(self._text, None)

    def take_logprobs(self, done: bool) -> tuple[TokenLogprob, ...]:
        """Entries whose text start has been sent; with `done`, all (none points past the text)."""
        end = self.base + self.sent
        if done:
            out = [TokenLogprob(e.token, e.scored, min(e.offset, end)) for e in self._pending]
        else:
            out = [e for e in self._pending if e.offset <= end]  # offsets are monotone: a prefix
        del self._pending[:len(out)]
        return tuple(out)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
