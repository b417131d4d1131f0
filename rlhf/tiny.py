"""No-hub tiny model factory: a locally trained byte-level BPE tokenizer and a
small GPT-2-architecture model, saved as a standard HF directory.

The paper's models are GPT-3 architecture; GPT-2 is the same decoder (minus the
sparse attention bands) and its `resid_pdrop` is the paper's "residual dropout".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# Distinct from EOS on purpose: padding must never be confused with a real end of text.
PAD_TOKEN = "<|pad|>"

# The tiny model only ever sees the synthetic task's prompts
# ("Instruction: ...\nInput: ...\nResponse:", rlhf/synthetic/tasks.py), which
# carry their own answer cue. So a user message is rendered verbatim (send the
# task's prompt text as the content), an assistant message verbatim followed by
# <|endoftext|>, a system message verbatim followed by a blank line, and the
# generation prompt adds nothing: chat serving feeds the model exactly the
# prompt it was trained on.
CHAT_TEMPLATE = (
    # Newlines are emitted as Jinja string literals because `{%- -%}` strips raw ones.
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + '" + EOS_TOKEN + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (GPT-2 style, no prefix space).

    Special tokens: `<|endoftext|>` is bos/eos/unk, `<|pad|>` is pad (distinct id).
    Padding side is right. The chat template (`CHAT_TEMPLATE`) renders a user
    message verbatim, so one user message holding a synthetic task prompt
    becomes exactly that prompt (see the comment on `CHAT_TEMPLATE`).
    The vocabulary never goes below 258 (256 byte symbols + 2 specials).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (leading spaces included).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # Seeding all 256 byte symbols means any string is encodable: no unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyGPT2Config:
    """Architecture knobs of the tiny base model (GPT-2 names)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    resid_pdrop: float = 0.0  # the paper's residual dropout (0.2 during SFT)
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 256,
    resid_pdrop: float = 0.0,
    embd_pdrop: float = 0.0,
    attn_pdrop: float = 0.0,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 LM sized to `tokenizer`, deterministic in `seed`."""
    arch = TinyGPT2Config(n_layer, n_head, n_embd, n_positions, resid_pdrop, embd_pdrop, attn_pdrop)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # GPT-2's tanh GELU as one fused op: the same function as its default "gelu_new" (within
        # 1.2e-7), whose eight elementwise ops made a training step 1.1-1.3x slower here (bench/activation.py)
        activation_function="gelu_pytorch_tanh",
        **asdict(arch),
    )
    # fork_rng: the init is seeded without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return model


def never_emit(model: GPT2LMHeadModel, token_id: int, margin: float = 50.0) -> None:
    """Push `token_id`'s logit about `margin` below every other (e.g. EOS, for fixed-length outputs).

    The final LayerNorm's bias gets a unit direction u times `margin` and the token's (tied)
    embedding becomes -u: its logit is then at most sqrt(n_embd) - margin at init, while
    the others move by margin * (u . their embedding), about N(0, 1) for GPT-2's 0.02 init.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(token_id)
        u = torch.randn(model.config.n_embd)
        u /= u.norm()
        model.transformer.ln_f.bias.copy_(margin * u)
        model.transformer.wte.weight[token_id] = -u


def make_tiny_base(
    out_dir: str | Path,
    texts: Iterable[str],
    vocab_size: int = 1024,
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """Train a tokenizer on `texts`, build the tiny model, save both (safetensors) to `out_dir`.

    The directory loads offline with AutoTokenizer / AutoModelForCausalLM.from_pretrained.
    `model_kwargs` are the fields of `TinyGPT2Config`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_positions = model_kwargs.get("n_positions", TinyGPT2Config.n_positions)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=n_positions)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def set_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Set residual dropout to `p` on a GPT-2 model, both in its config and its live modules.

    Residual paths in GPT-2 are the attention output projection (`attn.resid_dropout`)
    and the MLP output (`mlp.dropout`); embedding and attention-probability dropout
    are left alone. Accepts any GPT-2 PreTrainedModel (LM, sequence classifier, bare
    backbone) or a wrapper exposing one as `.model`.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    hf = model.model if not isinstance(model, PreTrainedModel) and hasattr(model, "model") else model
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if not isinstance(hf, PreTrainedModel) or model_type != "gpt2":
        raise NotImplementedError(
            f"set_residual_dropout supports GPT-2 models only, got {type(model).__name__}"
            f" (model_type={model_type!r}); add the architecture's residual dropout modules here"
        )
    hf.config.resid_pdrop = p
    for block in hf.base_model.h:
        block.attn.resid_dropout.p = p
        block.mlp.dropout.p = p
