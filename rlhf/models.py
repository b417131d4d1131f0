"""Policy loading and the scalar-head reward / value model.

The reward model (RM) and the value model (critic) are a transformers backbone
whose unembedding is replaced by a scalar projection (InstructGPT, Appendix C).
They are stored as the HF class `AutoModelForSequenceClassification` resolves
for the architecture (num_labels=1), so checkpoints are plain HF directories.
We never use HF's pooling: it looks for `pad_token_id` in the ids, which is
wrong whenever pad == eos and a sequence ends with (or contains) eos. Instead
the last attended position is read off the attention mask.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely; the message names the file."""


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated JSON ({_first_line(e)})") from None


def check_checkpoint(path: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse a local HF model directory that would load unsafely or not at all, naming the file.

    Weights must be safetensors (pickle formats can run code when loaded); every
    weight file's header must parse and cover the file (catches truncation); a
    config asking for custom code (`auto_map`) needs `trust_remote_code`, which
    is off unless the config's `model.trust_remote_code` turns it on. Paths that
    are not local directories (hub names) are left to transformers.
    """
    root = Path(path)
    if not root.is_dir():
        if root.exists():
            raise CheckpointError(f"{root}: not a checkpoint directory")
        return
    config = _read_json(root / "config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise CheckpointError(f"{root / 'config.json'}: the model needs custom code (auto_map), and "
                              f"trust_remote_code is off (set model.trust_remote_code: true to run it)")
    if (root / WEIGHTS_INDEX).exists():
        weight_map = _read_json(root / WEIGHTS_INDEX).get("weight_map", {})
        files = sorted({root / name for name in weight_map.values()})
    elif (root / WEIGHTS_FILE).exists():
        files = [root / WEIGHTS_FILE]
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f"; found only pickle weights {pickles}, which are not loaded (they can run code): "
                f"re-save them with save_pretrained(safe_serialization=True)") if pickles else ""
        raise CheckpointError(f"{root / WEIGHTS_FILE}: missing{hint}")
    from safetensors import safe_open

    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {root / WEIGHTS_INDEX})")
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{file}: corrupt or truncated safetensors ({_first_line(e)})") from None


def load_state_file(path: str | Path) -> Any:
    """A torch.save'd state (tensors and plain containers) with `weights_only=True`, never code.

    A truncated or corrupt file, or one holding other objects, raises CheckpointError naming it.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused, it holds objects other than tensors and plain "
                              f"containers (loaded with weights_only=True): {_first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated ({_first_line(e)})") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local HF directory."""
    return AutoTokenizer.from_pretrained(str(path))


def load_policy(
    path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load any causal LM from a local HF directory (safetensors only)."""
    check_checkpoint(path, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding starts real text at 0.

    Padding slots get a clamped, harmless position (0 on the left, the last real
    position repeated on the right); their outputs are masked anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token in each row ([B]); works for left and right padding.

    A row with no attended token gets index 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as the float one every attention kernel adds (eager adds a bool as 0/1)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _scalar_head(model: PreTrainedModel) -> nn.Linear:
    """The num_labels=1 projection of an HF sequence classifier (named `score` in decoder LMs)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise NotImplementedError(
            f"{type(model).__name__} has no 1-output `score` linear head; only decoder-LM"
            " sequence classifiers (GPT-2, Llama, Mistral, Qwen, ...) are supported"
        )
    return head


class ScalarModel(nn.Module):
    """Reward model / critic: an HF `*ForSequenceClassification` (num_labels=1) used per token.

    `values` is the head output at every position plus `config.reward_bias`
    (padding slots zeroed); `score` is `values` read at the last attended token.
    HF's own forward returns the raw head output without the bias, so for a
    sequence HF pools correctly: raw_hf_logit + config.reward_bias == score.
    The bias is the paper's RM normalisation (demonstrations score 0 on average);
    it is a plain float in config.json, so a critic initialised from the RM with
    `from_pretrained` starts on the same scale.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        _scalar_head(model)  # fail early on unsupported classes
        self.model = model
        model.config.reward_bias = float(getattr(model.config, "reward_bias", 0.0))

    @property
    def head(self) -> nn.Linear:
        # A property, not a submodule: the head must not appear twice in state_dict
        # (keys are the HF ones under "model.").
        return _scalar_head(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def reward_bias(self) -> float:
        return float(self.model.config.reward_bias)

    @reward_bias.setter
    def reward_bias(self, value: float) -> None:
        self.model.config.reward_bias = float(value)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Same as `values`; `forward` so DDP-style wrappers see the call.

        A [B, 1, T, T] bool `attention_mask` (packed sequences, `rlhf.collate.RankingBatch`)
        needs its `position_ids`; no slot is zeroed then, the caller picks the ones it reads.
        """
        packed = attention_mask.dim() == 4
        if packed and position_ids is None:
            raise ValueError("a 4-D attention mask needs position_ids")
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=additive_mask(attention_mask, self.model.dtype) if packed else attention_mask,
            position_ids=position_ids_from_mask(attention_mask) if position_ids is None else position_ids,
            use_cache=False,
        ).last_hidden_state
        # float32 out: losses and GAE on half-precision values lose too much.
        values = self.head(hidden).squeeze(-1).float() + self.reward_bias
        return values if packed else values.masked_fill(attention_mask == 0, 0.0)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token scalars [B, T] (the critic's V); 0 at padding."""
        return self(input_ids, attention_mask)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence [B], read at the last attended token (the RM's reward)."""
        values = self(input_ids, attention_mask)
        rows = torch.arange(values.shape[0], device=values.device)
        return values[rows, last_token_index(attention_mask)]

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> ScalarModel:
        """Load a saved RM / critic; refuses checkpoints whose scalar head is missing.

        To start an RM from a causal LM (which has no head yet), use `from_causal_lm`.
        """
        check_checkpoint(path, trust_remote_code)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=1,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        if info["missing_keys"]:
            raise ValueError(
                f"{path} lacks weights {sorted(info['missing_keys'])}: not a scalar-head"
                " checkpoint (use ScalarModel.from_causal_lm for an SFT/base model)"
            )
        return cls(model)

    @classmethod
    def from_causal_lm(
        cls,
        policy: str | Path | PreTrainedModel,
        seed: int = 0,
        head_std: float | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> ScalarModel:
        """Initialise an RM from a causal LM: backbone copied, LM head dropped, new scalar head.

        The head is drawn from N(0, head_std^2) with its own generator seeded by `seed`
        (default std 1/sqrt(hidden+1), as in Stiennon et al.); reward_bias starts at 0.
        """
        if isinstance(policy, PreTrainedModel):
            config = copy.deepcopy(policy.config)
            config.num_labels = 1
            config.architectures = None
            # fork_rng: the throwaway init must not shift the caller's global RNG.
            with torch.random.fork_rng(devices=[]):
                model = AutoModelForSequenceClassification.from_config(config)
            model.base_model.load_state_dict(policy.base_model.state_dict())
            ref = next(policy.parameters())
            model = model.to(device=ref.device, dtype=dtype or ref.dtype)
        else:
            check_checkpoint(policy, trust_remote_code)
            with torch.random.fork_rng(devices=[]):
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(policy),
                    num_labels=1,
                    dtype=dtype,
                    use_safetensors=True,
                    trust_remote_code=trust_remote_code,
                )
        model.config.reward_bias = 0.0
        head = _scalar_head(model)
        std = head_std if head_std is not None else 1.0 / math.sqrt(head.in_features + 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(head.weight.shape, generator=gen) * std
            head.weight.copy_(weight.to(head.weight))
            if head.bias is not None:
                head.bias.zero_()
        return cls(model)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save as a standard HF directory (safetensors, reward_bias in config.json)."""
        out = Path(path)
        self.model.save_pretrained(out, safe_serialization=True)
        return out
