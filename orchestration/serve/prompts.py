"""What a request's prompt becomes before decoding: token ids, chat rendering, the length budget.

Tokenizer and model config only (no weights), so the HTTP front of the endpoint can check
and encode requests without holding the model; `ServeEngine` decodes with the same rules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from transformers import AutoConfig

from orchestration.serve.protocol import APIError
from rlhf.models import load_tokenizer

# Used when the tokenizer has no chat template: "role: content" lines, then the
# assistant's cue. Any checkpoint can be chatted with; a tokenizer's own
# template (rlhf.tiny.CHAT_TEMPLATE for our models) always wins.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
)


class PromptCodec:
    """A checkpoint's tokenizer and context length, as the endpoint's request checks use them."""

    def __init__(self, checkpoint: str | Path, trust_remote_code: bool = False) -> None:
        self.tokenizer = tok = load_tokenizer(checkpoint)
        cfg = AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code)
        self.context_length = int(getattr(cfg, "max_position_embeddings", None) or tok.model_max_length)
        self.vocab_size = int(cfg.vocab_size)
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # An empty prompt still needs one token to condition on (as OpenAI does for GPT-2).
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._token_texts: dict[int, str] = {}

    # ---- prompts --------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:  # e.g. lone surrogates the Rust tokenizer cannot take
            raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
        return self._nonempty(ids)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})",
                           param="prompt")
        return self._nonempty(list(ids))

    def _nonempty(self, ids: list[int]) -> list[int]:
        if ids:
            return ids
        if self.start_id is None:
            raise APIError(400, "prompt is empty and the tokenizer has no BOS token", param="prompt")
        return [self.start_id]

    def render_chat(self, messages: list[dict]) -> str:
        template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may refuse a role order (raise_exception)
            raise APIError(400, f"messages cannot be rendered by the chat template: {e}",
                           param="messages") from None

    def budget(self, prompt_len: int, max_tokens: int | None, limit: int) -> int:
        """The max_tokens to use; 400 when the prompt or the request does not fit."""
        room = self.context_length - prompt_len
        if room < (0 if max_tokens == 0 else 1):  # scoring a prompt (echo, max_tokens 0) needs no room
            raise APIError(400, f"prompt is {prompt_len} tokens; this model's context is "
                           f"{self.context_length} tokens and leaves no room for a completion",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(room, limit)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limit}",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"this model's context is {self.context_length} tokens; the prompt "
                           f"({prompt_len}) plus max_tokens ({max_tokens}) exceed it",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def token_text(self, token: int) -> str:
        """A token's own text as logprobs show it (special tokens by name)."""
        text = self._token_texts.get(token)
        if text is None:  # at most one entry per vocabulary token
            text = self._token_texts[token] = self.tokenizer.decode(
                [token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text
